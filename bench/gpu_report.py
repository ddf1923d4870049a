"""The Markdown report of `make gpu-check`: render_md(results) -> text, a section per part rendered from its data
alone (no code per part): its figures as an item / value table, then a table for each list or dict of rows, nested
deeper as sub-tables. Box-safe at import: stdlib only."""
from __future__ import annotations

from flf2v.bench import report


def num(x, fmt: str = "{:.3g}") -> str:
    return report.num(x, fmt, none="-")


def render_md(res: dict) -> str:
    m = res.get("machine", {})
    gpu = m.get("gpu") or "no GPU (CPU smoke run)"
    lines = [f"# gpu-check: {gpu}, {res['started'][:10]}", "",
             f"All figures below come from this one run of `python -m flf2v.bench.gpu_check` on this GPU ({gpu}, sm "
             f"{m.get('capability')}, {m.get('memory_gib')} GiB, driver {m.get('driver')}, CUDA {m.get('cuda_runtime')}; "
             f"torch {m.get('torch')}, triton {m.get('triton')}, Python {m.get('python')}), with random weights; "
             f"nothing is copied from elsewhere. Values a part's note calls extrapolated are computed from measured "
             f"ones as it states."
             if res["mode"] == "gpu" else f"**{res['mode']}**: a test of this tool's code on a CPU, not a measurement.",
             "", f"Commit {m.get('git_commit')}{' (dirty)' if m.get('git_dirty') else ''}; budget {res['budget_s']:.0f} s; "
                 f"total {num(res.get('seconds'), '{:.0f}')} s; exit code {res.get('exit_code')}"
                 f"{'; --quick' if res.get('quick') else ''}.", ""]
    order = sorted(res["parts"].items(), key=lambda kv: kv[1]["number"])
    lines += report.table(["part", "status", "seconds", "planned", "note"],
                          [[f"{p['number']}. {p['title']}", p["status"], num(p.get("seconds"), "{:.1f}"),
                            p.get("planned_s", "-"), p.get("error") or p.get("reason") or p.get("note") or ""]
                           for _, p in order], left=2)
    for key, p in order:
        lines += ["", f"## {p['number']}. {p['title']}: {p['status']}", ""]
        lines += [f"Error: {p['error']}", ""] if p.get("error") else []
        lines += [f"Skipped: {p['reason']}", ""] if p.get("reason") else []
        lines += ["```", p["traceback"].rstrip(), "```", ""] if p.get("traceback") else []
        if p.get("data"):
            try:
                lines += _part(p["data"] if key != "environment" else {"machine": m} | p["data"])
            except Exception as e:  # noqa: BLE001 - a rendering bug must not lose the JSON written beside it
                lines.append(f"(could not render this part: {type(e).__name__}: {e}; see the JSON)")
    return "\n".join(lines) + "\n"


def _part(data: dict) -> list[str]:
    """A part's figures as an item / value table, then a table for each list or dict of rows."""
    cells, apart = _flatten(data)
    lines = report.table(["item", "value"], cells.items()) if cells else []
    for name, rows in apart.items():
        lines += [""] + _table(name, rows, 3)
    return lines


def _table(title: str, rows, level: int) -> list[str]:
    """Rows (a dict of them: a first column of their names; a list) as one table with the union of their
    columns; what a row holds deeper follows as sub-tables."""
    named = isinstance(rows, dict)
    flat = [(name, *_flatten(r)) for name, r in (rows.items() if named else enumerate(rows))]
    cols = list(dict.fromkeys(c for _, cells, _ in flat for c in cells))
    out = [f"{'#' * level} {title}", ""] + report.table(
        ["name"] * named + cols, [[name] * named + [cells.get(c, "") for c in cols] for name, cells, _ in flat])
    for name, cells, apart in flat:
        label = name if named else " ".join(list(cells.values())[:3])  # a list's rows: their first figures
        for key, sub in apart.items():
            out += [""] + _table(f"{title}: {label}: {key}", sub, min(level + 1, 6))
    return out


def _flatten(d: dict, prefix: str = "") -> tuple[dict[str, str], dict]:
    """d's cells by column name (nested dicts dotted, a dict of integers one shape cell such as `dims (T x hp x
    wp)` = `3 x 3 x 5`), and apart what needs a table of its own (a list or dict of dicts)."""
    cells, apart = {}, {}
    for k, v in d.items():
        name, rows = f"{prefix}{k}", v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        if rows and all(isinstance(r, dict) for r in rows):
            apart[name] = v
        elif isinstance(v, dict) and _ints(v.values()):
            cells[f"{name} ({' x '.join(map(str, v))})"] = _cell(list(v.values()))
        elif isinstance(v, dict):
            more, deeper = _flatten(v, f"{name}.")
            cells, apart = cells | more, apart | deeper
        else:
            cells[name] = _cell(v)
    return cells, apart


def _ints(xs) -> bool:
    xs = list(xs)
    return bool(xs) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def _cell(x) -> str:
    if isinstance(x, float):
        return num(x, "{:.6g}")  # six digits: cosines near 1 stay apart
    if isinstance(x, list):  # a list of integers is a shape
        return (" x " if _ints(x) else ", ").join(_cell(v) if not isinstance(v, (list, dict)) else str(v) for v in x)
    return "-" if x is None else " ".join(str(x).split())
