"""bench/real_shapes.py's tables: each side's step summary, the main comparison and the budget sweep."""

from __future__ import annotations

from vs_trl import PHASE_DOCS, PHASES, side_table, summarize

SIDES = ("trl", "forkrl")
STAGE_DOCS = {  # the stages bench/_forkrl_side.py and bench/_trl_side.py track peak RSS over
    "generate": "sampling the completions (+ rewards on the forkrl side)",
    "scoring": "forkrl's no-grad scoring pass (skipped when the sampler's log-probs are reused)",
    "selection": "forkrl's selection plan",
    "update": "forward, backward and optimizer step over the micro-batches (TRL: the rest of its step)",
}


# ---------------------------------------------------------------- child processes


def _fmt(x: float, spec: str = ".1f") -> str:
    return "-" if x != x else format(x, spec)


def _side_summary(res: dict, warmup: int) -> dict:
    s = summarize([res], warmup)
    s["stage_peak"] = res.get("stage_peak_rss_mib", {})
    s["resp_len"] = statistics_mean(
        [st.get("response_len_mean", float("nan")) for st in res["steps"][warmup:]]
    )
    return s


def statistics_mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _print_main(con, main: dict, st: dict) -> None:
    from rich.table import Table

    tab = Table(title=f"one RL step at L={st['max_new_tokens']}: seconds and peak memory (RSS, MiB)")
    for col in (
        "",
        "s/step",
        "steps/s",
        "CPU s/step",
        "RSS at start",
        "peak",
        "growth",
        "resp len",
        "micro-batch",
    ):
        tab.add_column(col, justify="right", no_wrap=True)
    for side, name in (("trl", "TRL"), ("forkrl", "forkrl")):
        s = main.get(side)
        mb = (
            f"{st['trl_micro_batch']} rows"
            if side == "trl"
            else f"{st['forkrl_overrides'][0].split('=')[1]} tok"
        )
        if s is None or "failed" in s:
            tab.add_row(name, *(["-"] * 7), mb)
            continue
        tab.add_row(
            name,
            _fmt(s["s_per_step"], ".2f"),
            _fmt(s["steps_per_s"], ".4f"),
            _fmt(s["cpu_s_per_step"], ".1f"),
            _fmt(s["rss_before_train_mib"], ".0f"),
            _fmt(s["peak_rss_mib"], ".0f"),
            _fmt(s["peak_rss_mib"] - s["rss_before_train_mib"], ".0f"),
            _fmt(s["resp_len"], ".0f"),
            mb,
        )
    con.print(tab)
    t, f = main.get("trl"), main.get("forkrl")
    for side in SIDES:
        if main.get(side) and "failed" in main[side]:
            con.print(f"{side}: FAILED ({main[side]['failed']})")
    ok = {side: main[side] for side in SIDES if main.get(side) and "failed" not in main[side]}
    t, f = ok.get("trl", {}), ok.get("forkrl", {})
    if t and f:
        speed = t["s_per_step"] / f["s_per_step"]
        mem = f["peak_rss_mib"] / t["peak_rss_mib"]
        growth = (f["peak_rss_mib"] - f["rss_before_train_mib"]) / max(
            1e-9, t["peak_rss_mib"] - t["rss_before_train_mib"]
        )
        con.print(
            f"forkrl steps/s / TRL steps/s: [bold]{speed:.2f}x[/bold] (target >= 2x: "
            f"{'met' if speed >= 2 else 'NOT met'})   peak RSS forkrl/TRL: [bold]{mem:.2f}[/bold] "
            f"(target <= 0.5: {'met' if mem <= 0.5 else 'NOT met'})   growth forkrl/TRL: {growth:.2f}"
        )
    if not ok:
        return
    nan = float("nan")
    ph = side_table("where the step's time goes (seconds per stage)")
    for p in PHASES:
        ph.add_row(
            p,
            _fmt(t.get("phases", {}).get(p, nan), ".2f"),
            _fmt(f.get("phases", {}).get(p, nan), ".2f"),
            PHASE_DOCS[p],
        )
    ph.add_row("step", _fmt(t.get("s_per_step", nan), ".2f"), _fmt(f.get("s_per_step", nan), ".2f"), "")
    con.print(ph)
    mem_tab = side_table("where the memory peaks (peak RSS while each stage runs, MiB; sampled every 5 ms)")
    for name, what in STAGE_DOCS.items():
        tp, fp = t.get("stage_peak", {}).get(name), f.get("stage_peak", {}).get(name)
        if tp is None and fp is None:
            continue
        mem_tab.add_row(
            name, _fmt(tp if tp is not None else nan, ".0f"), _fmt(fp if fp is not None else nan, ".0f"), what
        )
    mem_tab.add_row(
        "whole run",
        _fmt(t.get("peak_rss_mib", nan), ".0f"),
        _fmt(f.get("peak_rss_mib", nan), ".0f"),
        "the process's ru_maxrss (model load included)",
    )
    con.print(mem_tab)


def _print_sweep(con, sweep: list[dict], budget: int) -> None:
    from rich.table import Table

    tab = Table(
        title=f"peak memory vs response length at micro_batch_tokens={budget} (RSS, MiB; seconds per step)"
    )
    for col in (
        "L",
        "rows",
        "forkrl s/step",
        "forkrl peak",
        "peak / peak(first)",
        "forkrl growth",
        "gen peak",
        "update peak",
        "TRL rows/micro",
        "TRL s/step",
        "TRL peak",
        "peak forkrl/TRL",
    ):
        tab.add_column(col, justify="right", no_wrap=True)
    first = next((r["forkrl"]["peak_rss_mib"] for r in sweep if "failed" not in r["forkrl"]), float("nan"))
    worst = 0.0
    for r in sweep:
        f, t = r["forkrl"], r.get("trl")
        ok_f = "failed" not in f
        if ok_f:
            worst = max(worst, f["peak_rss_mib"] / first)
        ok_t = t is not None and "failed" not in t and "skipped" not in t
        tab.add_row(
            str(r["length"]),
            str(r["rows"]),
            _fmt(f["s_per_step"], ".1f") if ok_f else f"FAILED ({f['failed']})",
            _fmt(f["peak_rss_mib"], ".0f") if ok_f else "-",
            _fmt(f["peak_rss_mib"] / first, ".2f") if ok_f else "-",
            _fmt(f["peak_rss_mib"] - f["rss_before_train_mib"], ".0f") if ok_f else "-",
            _fmt(f["stage_peak"].get("generate", float("nan")), ".0f") if ok_f else "-",
            _fmt(f["stage_peak"].get("update", float("nan")), ".0f") if ok_f else "-",
            str(r["trl_micro_batch"]),
            _fmt(t["s_per_step"], ".1f")
            if ok_t
            else "not run"
            if t is None
            else t.get("skipped") or f"FAILED ({t['failed']})",
            _fmt(t["peak_rss_mib"], ".0f") if ok_t else "-",
            _fmt(f["peak_rss_mib"] / t["peak_rss_mib"], ".2f") if ok_t and ok_f else "-",
        )
    con.print(tab)
    con.print(
        f"forkrl peak across lengths, worst / first length: [bold]{worst:.2f}[/bold] "
        f"(target <= 1.2 of the first, 256-token case by default: {'met' if worst <= 1.2 else 'NOT met'})"
    )
