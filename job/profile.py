"""What TensorBoard's Profile tab shows for one of the job's traces, read with the profile
plugin's own converter (xprof, shipped with tensorboard-plugin-profile).

`step_summary(xplane, tool)` returns the numbers of the overview page's (or the input-pipeline
analyzer's) step-time table: the steps found, the average step time, the share of it spent
waiting for input, and whether the page says "No step marker observed". The tool's output is
a JSON list of Google Charts DataTables; the step table is the one with a `stepTimeMs` column
(one row per step), the diagnostics the one with `severity`/`message`. The input share is
100 x sum(infeedTimeMs) / sum(stepTimeMs), xprof's own formula (the JSON does not carry it).
"""

from __future__ import annotations

import glob
import json
import os

NO_STEP_MARKER = "No step marker observed"
TOOLS = ("overview_page", "input_pipeline_analyzer")


def traces(profile_run: str) -> list[str]:
    """The .xplane.pb files of a TensorBoard run folder (<run>/plugins/profile/<session>/)."""
    return sorted(glob.glob(os.path.join(profile_run, "plugins", "profile", "*", "*.xplane.pb")))


def _table(tables: list, column: str):
    return next((t for t in tables if any(c.get("id") == column for c in t.get("cols", []))), None)


def summarize(tables: list) -> dict:
    """Step-time summary of a tool's DataTables (as the converter or TensorBoard's HTTP API give them)."""
    steps, diagnostics = _table(tables, "stepTimeMs"), _table(tables, "severity")
    columns = [c["id"] for c in steps["cols"]] if steps else []
    rows = [{c: cell.get("v") for c, cell in zip(columns, row["c"])} for row in (steps or {}).get("rows", [])]
    total = sum(r["stepTimeMs"] for r in rows)
    messages = [row["c"][1].get("v") or "" for row in (diagnostics or {}).get("rows", [])]
    return {"steps": len(rows), "step_names": [r["stepnum"] for r in rows],
            "average_step_ms": total / len(rows) if rows else 0.0,
            "input_percent": 100.0 * sum(r["infeedTimeMs"] for r in rows) / total if total else 0.0,
            "no_step_marker": any(NO_STEP_MARKER in m for m in messages)}


def step_summary(xplane: str, tool: str = "overview_page") -> dict:
    """summarize() of `tool` for one trace. The converter writes a cache beside the trace."""
    from xprof.convert import raw_to_tool_data  # a large C extension: loaded only when asked

    data, _ = raw_to_tool_data.xspace_to_tool_data([xplane], tool, {"use_saved_result": False})
    if data is None:
        raise RuntimeError(f"the profile plugin could not read {xplane} for {tool}")
    return summarize(json.loads(data))
