"""Reports comparing defences: a Markdown file, a terminal table and two PNG plots of their
safety (`casa eval`); the terminal tables and the PNG chart of their cost (`casa profile`,
`print_costs`, `plot_costs`).

Input is ``metrics.defence_metrics``' shape: ``{defence: {"attack_success_rate",
"over_refusal_rate", "n_harmful", "n_benign", and for scored defences "auroc", "f1",
"tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "roc": {"fpr", "tpr"}}}``.

Plots use matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``), so
importing this module never switches the process-wide pyplot backend.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

from casa_cli import output

# (key, column title, is a rate shown as a percentage). Titles break where a terminal table
# should wrap them, which keeps it within 80 columns; Markdown joins the lines.
COLUMNS = (
    ("attack_success_rate", "attack\nsuccess", True),
    ("over_refusal_rate", "over\nrefusal", True),
    ("auroc", "AUROC", False),
    ("f1", "F1", False),
    ("tpr_at_1pct_fpr", "TPR@1%\nFPR", True),
    ("tpr_at_5pct_fpr", "TPR@5%\nFPR", True),
)
HEADER = ["defence"] + [title for _, title, _ in COLUMNS] + ["n\n(h/b)"]


@dataclass
class Report:
    """What `casa_cli.evaluate` made. `metrics`: metrics.json's content; `paths`: the files
    written (records, markdown, roc, tradeoff, metrics); `results` and how many `failed`.
    Under torchrun only rank 0 writes: the other ranks get no metrics and no paths, and
    `failed` counts the failures of every rank."""
    metrics: dict | None
    paths: dict[str, Path]
    results: int
    failed: int


def _metric(value, percent: bool) -> str:
    """A metric for display: "-" when absent or undefined (NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _rows(metrics: Mapping[str, Mapping]) -> list[list[str]]:
    return [[defence] + [_metric(m.get(key), pct) for key, _, pct in COLUMNS]
            + [f"{m.get('n_harmful', 0)}/{m.get('n_benign', 0)}"]
            for defence, m in metrics.items()]


def markdown_table(metrics: Mapping[str, Mapping]) -> str:
    """The comparison as a GitHub-flavoured Markdown table, one row per defence."""
    lines = ["| " + " | ".join(" ".join(title.split()) for title in HEADER) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(metrics)]
    return "\n".join(lines)


def print_table(metrics: Mapping[str, Mapping], console: Console | None = None) -> None:
    """The comparison on the terminal (stdout unless `console`), one row per defence."""
    rows = [dict(zip(HEADER, row)) for row in _rows(metrics)]
    # Compact: with vertical rules nine columns overflow an 80-column terminal.
    output.print_table(rows, HEADER, title="Defences", console=console, compact=True)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_roc(metrics: Mapping[str, Mapping], path: str | Path) -> Path:
    """ROC curves of every defence that produced scores (CASA), with the chance diagonal."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    scored = {d: m for d, m in metrics.items() if m.get("roc")}
    for defence, m in scored.items():
        label = f"{defence} (AUROC {_metric(m.get('auroc'), False)})"
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=label)
    if not scored:
        ax.text(0.5, 0.5, "no scored defence", ha="center", va="center")
    ax.set(xlabel="false-positive rate (benign flagged)",
           ylabel="true-positive rate (harmful flagged)",
           xlim=(0, 1), ylim=(0, 1.01), title="Safety score ROC")
    ax.legend(loc="lower right")
    return _save(fig, Path(path))


def plot_tradeoff(metrics: Mapping[str, Mapping], path: str | Path) -> Path:
    """Attack success (lower is safer) against over-refusal (lower is more useful), one
    point per defence: the best defence sits nearest the origin."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for defence, m in metrics.items():
        x, y = m.get("over_refusal_rate"), m.get("attack_success_rate")
        if x is None or y is None or math.isnan(x) or math.isnan(y):
            continue  # a defence run on one class only has no point on this plane
        ax.scatter([100 * x], [100 * y], s=60)
        ax.annotate(defence, (100 * x, 100 * y), textcoords="offset points", xytext=(6, 4))
    ax.set(xlabel="over-refusal on benign prompts (%)",
           ylabel="attack success on harmful prompts (%)",
           xlim=(-5, 105), ylim=(-5, 105), title="Safety vs. helpfulness")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def write_report(metrics: Mapping[str, Mapping], out_dir: str | Path,
                 title: str = "casa evaluation",
                 breakdowns: Mapping[str, Mapping[str, Mapping]] | None = None) -> dict:
    """Write report.md, roc.png and tradeoff.png to ``out_dir``; returns their paths.

    ``breakdowns`` maps a grouping name ("category", "modality") to ``metrics.breakdown``'s
    {group: {defence: metrics}}; each group gets its own table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(metrics, out / "roc.png")
    tradeoff = plot_tradeoff(metrics, out / "tradeoff.png")
    parts = [f"# {title}", "",
             "Attack success: harmful prompts answered (lower is safer). Over-refusal: benign "
             "prompts refused (lower is more useful). Score metrics treat harmful as positive; "
             "TPR@FPR thresholds are set on benign scores only. n (h/b): harmful/benign "
             "prompts counted.", "",
             markdown_table(metrics), "",
             f"![ROC]({roc.name})", "", f"![trade-off]({tradeoff.name})", ""]
    for name, groups in (breakdowns or {}).items():
        parts += [f"## By {name}", ""]
        for group, group_metrics in groups.items():
            parts += [f"### {group}", "", markdown_table(group_metrics), ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(parts), encoding="utf-8")
    return {"markdown": markdown, "roc": roc, "tradeoff": tradeoff}


def write_outputs(metrics: dict, out_dir: str | Path, title: str = "casa eval") -> dict:
    """`casa eval`'s report.md, roc.png, tradeoff.png (`write_report`) and metrics.json (from
    `evaluation.summarise`) in ``out_dir``, with what was run and each defence's cost
    appended to the report."""
    out = Path(out_dir)
    paths = write_report(metrics["defences"], out, title=title,
                         breakdowns={"source": metrics["by_source"],
                                     "modality": metrics["by_modality"],
                                     "category": metrics["by_category"]})
    facts = {k: v for k, v in metrics.items()
             if k not in ("defences", "by_source", "by_modality", "by_category")}
    lines = ["## Run", ""] + [f"- {key}: {value}" for key, value in facts.items()]
    monitor = metrics.get("monitor")
    if monitor:
        lines += ["", f"Response monitor on: every answer was decoded under it (p_unsafe of prompt "
                      f"+ answer checked every {monitor['every']} token(s) against "
                      f"{monitor['threshold']}, on flag {monitor['on_flag']}); an answer it "
                      "replaced by the refusal text counts as refused."]
    stops = " stopped by the monitor |" if monitor else ""
    lines += ["", "## Cost per prompt", "",
              f"| defence | mean latency (ms) | mean new tokens | failed |{stops}",
              "|---|---:|---:|---:|" + ("---:|" if monitor else "")]
    lines += [f"| {d} | {m.get('latency_ms_mean')} | {m.get('new_tokens_mean')} | {m.get('errors', 0)} |"
              + (f" {m.get('monitor_stops')} |" if monitor else "")
              for d, m in metrics["defences"].items()]
    with paths["markdown"].open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(output.strict_json(metrics), indent=1, ensure_ascii=False)
                                + "\n", encoding="utf-8")
    return paths


# --- casa profile -----------------------------------------------------------------------
COST_COLUMNS = ["prompt", "batch", "defence", "input tokens", "prefill ms", "safety ms",
                "first token ms", "decode tok/s", "x prefill", "x first token", "x per token",
                "safety % of prefill", "guard / casa"]
MONITOR_COST_COLUMNS = ["prompt", "batch", "defence", "decode ms/token", "monitored ms/token",
                        "monitor ms/token", "monitor % of step", "% of answer decode"]
INPUT_COST_COLUMNS = ["prompt", "batch", "input tokens", "prepare ms", "head us (torch)",
                      "head us (triton)", "monitor us/token"]
VERDICT_COST_COLUMNS = ["prompt", "batch", "defence", "prompts/s", "full forward prompts/s",
                        "x full forward", "refusal ms", "full prefill ms", "refusal / prefill",
                        "head layer", "bound"]


def _number(value: float) -> str:
    """Three significant digits, without exponents for large timings."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _spread(stat: dict | None) -> str:
    """median [min-max]"""
    if stat is None:
        return ""
    return f"{_number(stat['median'])} [{_number(stat['min'])}-{_number(stat['max'])}]"


def _median(stat: dict | None) -> str:
    return "" if stat is None else _number(stat["median"])


def print_costs(report: dict) -> None:
    """`profiling.profile`'s report on the terminal: each defence's timings and ratios to
    none, the response monitor's cost (with --monitor), a verdict alone (with casa), the
    inputs and the safety head alone, and the environment."""
    rows = [{"prompt": r["prompt_tokens"], "batch": r["batch"], "defence": r["defence"],
             "input tokens": r["input_tokens"], "prefill ms": _spread(r["prefill_ms"]),
             "safety ms": _spread(r.get("safety_ms")), "first token ms": _spread(r["first_token_ms"]),
             "decode tok/s": _spread(r["decode_tokens_per_s"]),
             "x prefill": _median(r["prefill_ratio"]), "x first token": _median(r["first_token_ratio"]),
             "x per token": _median(r["decode_cost_ratio"]),
             "safety % of prefill": _median(r.get("safety_pct_of_prefill")),
             "guard / casa": _median(r.get("guard_vs_casa"))} for r in report["rows"]]
    output.print_table(rows, COST_COLUMNS, title=f"casa profile: {report['repeats']} repeats, "
                       f"{report['new_tokens']} new tokens; median [min-max], ratios are x none")
    if report.get("monitor"):
        monitored = [{"prompt": r["prompt_tokens"], "batch": r["batch"], "defence": r["defence"],
                      "decode ms/token": _spread(r["decode_ms_per_token"]),
                      "monitored ms/token": _spread(r["monitor_decode_ms_per_token"]),
                      "monitor ms/token": _median(r["monitor_ms_per_token"]),
                      "monitor % of step": _median(r["monitor_pct_of_decode_step"]),
                      "% of answer decode": _median(r["monitor_pct_of_answer_decode"])}
                     for r in report["rows"]]
        output.print_table(monitored, MONITOR_COST_COLUMNS,
                           title="the response monitor, checking every token; % from paired runs")
    verdicts = [{"prompt": v["prompt_tokens"], "batch": v["batch"], "defence": "classify",
                 "prompts/s": _spread(v["classify_prompts_per_s"]),
                 "full forward prompts/s": _spread(v["full_forward_prompts_per_s"]),
                 "x full forward": _median(v["classify_speedup"]),
                 "refusal ms": _spread(v["refusal_ms"]), "full prefill ms": _spread(v["full_prefill_ms"]),
                 "refusal / prefill": _median(v["refusal_vs_prefill"]),
                 "head layer": f"{v['head_layer']} of {v['layers']}", "bound": _number(v["bound"])}
                for v in report.get("verdicts", [])]
    if verdicts:
        output.print_table(verdicts, VERDICT_COST_COLUMNS,
                           title="a verdict alone: the prefill stops after the head's layer "
                                 "(bound: layers / head layer)")
    inputs = [{"prompt": i["prompt_tokens"], "batch": i["batch"], "input tokens": i["input_tokens"],
               "prepare ms": _spread(i["prepare_ms"]),
               "head us (torch)": _spread(i["safety_head_us"].get("torch")),
               "head us (triton)": _spread(i["safety_head_us"].get("triton")),
               "monitor us/token": _spread(i.get("monitor_us"))}
              for i in report["inputs"]]
    output.print_table(inputs, INPUT_COST_COLUMNS,
                       title="inputs, and the safety head and the monitor's step alone")
    output.print_fields({k: v for k, v in report.items() if k not in ("rows", "inputs", "verdicts")},
                        title="environment")


STAGES = (("prefill", "tab:blue"), ("safety step", "tab:red"), ("decode", "tab:gray"))


def stage_ms(row: dict, new_tokens: int) -> tuple[float, float, float]:
    """Median ms of prefill, safety step (CASA's head, the guard's whole call) and decoding
    the remaining new tokens, for one row."""
    safety = row["safety_ms"]["median"] if "safety_ms" in row else 0.0
    decode = (new_tokens - 1) * row["decode_ms_per_token"]["median"]
    return row["prefill_ms"]["median"], safety, decode


def plot_costs(report: dict, path: str | Path) -> Path:
    """`profiling.profile`'s report as stacked bars of ms per stage for each defence, one
    panel per grid point (`casa profile --chart`)."""
    points = list(dict.fromkeys((r["prompt_tokens"], r["batch"]) for r in report["rows"]))
    fig = Figure(figsize=(1.6 + 3.4 * len(points), 4.2))
    FigureCanvasAgg(fig)  # tight_layout needs a renderer
    axes = fig.subplots(1, len(points), squeeze=False)
    for ax, (tokens, batch) in zip(axes[0], points):
        rows = [r for r in report["rows"] if (r["prompt_tokens"], r["batch"]) == (tokens, batch)]
        names = [r["defence"] for r in rows]
        bottom = [0.0] * len(rows)
        for index, (stage, colour) in enumerate(STAGES):
            heights = [stage_ms(r, report["new_tokens"])[index] for r in rows]
            ax.bar(names, heights, bottom=bottom, color=colour, label=stage)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{tokens} prompt tokens, batch {batch}", fontsize=9)
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", labelrotation=30)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"casa profile: {report['model']} on {report['device_name']}, "
                 f"{report['new_tokens']} new tokens", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
