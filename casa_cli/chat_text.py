"""A backbone's chat text (docs/design.md §2, "User text stays text"): user text kept plain,
prompts and (prompt, response) pairs through the model's chat template, and the middle
cut that `--truncate` makes. `Backbone` inherits it; it reads the backbone's `tokenizer`,
`processor` and `modalities`."""
from __future__ import annotations

import re
from functools import cached_property

from casa_cli.inputs import InputError, Sample

# Put after the first character of a control-token string found in user text, so that it
# reads the same but can no longer be tokenised as the control token itself.
WORD_JOINER = "\u2060"
# Stands in for the middle of a user text cut to fit the context (`--truncate`).
CUT_MARK = " [...] "
# Holds the assistant turn's place while the chat template writes a (prompt, response) pair:
# the text is cut there and the response put in its place, so that it ends with the
# response's last token (private-use characters: no template writes them).
RESPONSE_SLOT = "\ue000casa-response\ue000"


class ChatText:
    @cached_property
    def control_tokens(self) -> re.Pattern | None:
        """Every added token of the tokenizer (chat markers such as <|im_start|>, media
        placeholders such as <image>): strings that tokenise to a control token."""
        strings = {str(token) for token in self.tokenizer.added_tokens_decoder.values()}
        strings |= set(self.tokenizer.all_special_tokens)
        strings = sorted((t for t in strings if len(t) > 1 and t.strip()), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, strings))) if strings else None

    def plain_text(self, text: str) -> str:
        """User-supplied `text` that can never produce a control token: a word joiner goes
        after the first character of each control-token string in it (a typed <|im_end|>
        must not end the user's turn, nor a typed <image> claim an image slot)."""
        if self.control_tokens is None:
            return text
        return self.control_tokens.sub(lambda m: m[0][0] + WORD_JOINER + m[0][1:], text)

    def chat_text(self, sample: Sample, response: str | None = None) -> str:
        """The prompt as the model's chat template writes it, ready for generation. With a
        `response` (issue 17): the template's assistant turn holding it after the prompt, no
        generation prompt, the text ending with the response's last token (its end-of-turn
        marker not written): what a response monitor has read when an answer is done.
        Message contents and the response are user data: their control-token strings are
        neutralised (`plain_text`)."""
        messages = [{**m, "content": self.plain_text(m["content"])} for m in sample.messages]
        if self.modalities:  # processors' templates want structured content
            for message in messages:
                message["content"] = [{"type": "text", "text": message["content"]}]
            media = [{"type": "image"} for _ in sample.images]
            media += [{"type": "audio", "audio": str(p)} for p in sample.audio]
            messages[-1]["content"] = media + messages[-1]["content"]
        if response is not None:
            if not response.strip():
                raise InputError(f"{sample.id}: empty response")
            slot = [{"type": "text", "text": RESPONSE_SLOT}] if self.modalities else RESPONSE_SLOT
            messages.append({"role": "assistant", "content": slot})
        template_owner = self.processor if self.modalities else self.tokenizer
        if getattr(template_owner, "chat_template", None):
            text = template_owner.apply_chat_template(
                messages, add_generation_prompt=response is None, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
        if response is None:
            return text
        if RESPONSE_SLOT not in text:
            raise InputError(f"{sample.id}: the model's chat template writes no assistant turn")
        return text[:text.rindex(RESPONSE_SLOT)] + self.plain_text(response)

    def middle_cuts(self, parts: list[str], drop: int) -> list[str] | None:
        """`parts` (the user's text, the response) with `drop` tokens cut in all, each cut
        in its middle (` [...] `), keeping its start and end. The longest part is cut first,
        down to the next one's length, then both alike; a part left whole is unchanged.
        None when that would leave a part no token."""
        ids = [self.tokenizer(part, add_special_tokens=False)["input_ids"] for part in parts]
        left = sum(map(len, ids)) - drop
        if left < len(ids):
            return None
        kept = {}
        for n, i in enumerate(sorted(range(len(ids)), key=lambda i: len(ids[i]))):
            kept[i] = min(len(ids[i]), left // (len(ids) - n))
            left -= kept[i]
        decode = self.tokenizer.decode
        return [part if kept[i] == len(ids[i]) else
                (decode(ids[i][:(kept[i] + 1) // 2]) + CUT_MARK
                 + decode(ids[i][len(ids[i]) - kept[i] // 2:])).strip()
                for i, part in enumerate(parts)]
