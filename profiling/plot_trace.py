#!/usr/bin/env python3
"""Draw a remat Chrome trace (remat train --trace FILE.json) as a PNG timeline.

One horizontal lane per stream (and the host lane with the traced steps), one box per op
coloured by kind (forward, backward, recompute, wait, classifier, other), and the arena's
live bytes ("arena bytes" counter: all live bytes and activations) as curves underneath on
the same time axis.

usage: plot_trace.py TRACE.json [-o OUT.png] [--step N] [--start MS] [--end MS]
                     [--title TEXT] [--dpi N] [--width INCHES]
  --step N         zoom to the host span "step" with index N (the printed step number)
  --start/--end    zoom to [start, end] ms of the trace's time axis

Needs matplotlib (pip install matplotlib); nothing else in remat does.
"""
import argparse
import json
import sys

KIND_COLORS = {
    "forward": "#4C72B0",
    "backward": "#DD8452",
    "recompute": "#55A868",
    "wait": "#C44E52",
    "classifier": "#8172B3",
    "other": "#937860",
    "host": "#BBBBBB",
}
KIND_ORDER = ["forward", "backward", "recompute", "wait", "classifier", "other", "host"]


def load(path):
    with open(path) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names, sort_index, boxes, counters = {}, {}, [], []
    for e in events:
        ph = e.get("ph")
        if ph == "M" and e.get("name") == "thread_name":
            names[e["tid"]] = e["args"]["name"]
        elif ph == "M" and e.get("name") == "thread_sort_index":
            sort_index[e["tid"]] = e["args"]["sort_index"]
        elif ph == "X":
            boxes.append(e)
        elif ph == "C" and e.get("name") == "arena bytes":
            counters.append(e)
    counters.sort(key=lambda e: e["ts"])
    return names, sort_index, boxes, counters


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: TRACE with .png)")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--start", type=float, default=None, help="ms")
    ap.add_argument("--end", type=float, default=None, help="ms")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dpi", type=int, default=110)
    ap.add_argument("--width", type=float, default=14.0, help="figure width, inches")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names, sort_index, boxes, counters = load(args.trace)
    if not boxes:
        sys.exit(f"{args.trace}: no 'X' events to draw")

    lo = min(e["ts"] for e in boxes) / 1000.0
    hi = max(e["ts"] + e["dur"] for e in boxes) / 1000.0
    if args.step is not None:
        steps = [e for e in boxes if e.get("cat") == "host" and e["name"] == "step"
                 and e.get("args", {}).get("index") == args.step]
        if not steps:
            sys.exit(f"{args.trace}: no host span 'step' with index {args.step}")
        lo, hi = steps[0]["ts"] / 1000.0, (steps[0]["ts"] + steps[0]["dur"]) / 1000.0
    if args.start is not None:
        lo = args.start
    if args.end is not None:
        hi = args.end

    tids = sorted({e["tid"] for e in boxes}, key=lambda t: (sort_index.get(t, t), t))
    lane_of = {t: i for i, t in enumerate(reversed(tids))}  # first lane drawn on top

    fig, (ax, axm) = plt.subplots(
        2, 1, sharex=True, figsize=(args.width, 1.0 + 0.75 * len(tids) + 2.2),
        gridspec_kw={"height_ratios": [0.75 * len(tids), 2.2]})
    by_kind = {}
    for e in boxes:
        start, dur = e["ts"] / 1000.0, e["dur"] / 1000.0
        if start + dur < lo or start > hi:
            continue
        kind = e.get("cat", "other")
        kind = kind if kind in KIND_COLORS else "other"
        by_kind.setdefault((kind, e["tid"]), []).append((start, max(dur, 1e-4)))
    for (kind, tid), spans in by_kind.items():
        y = lane_of[tid]
        height = 0.4 if kind == "host" else (0.35 if kind == "wait" else 0.7)
        ax.broken_barh(spans, (y - height / 2, height), facecolors=KIND_COLORS[kind],
                       edgecolors="white" if kind != "host" else "none", linewidth=0.3)
    # Block index over the recompute and backward boxes wide enough to hold it; the step
    # number on the host lane.
    span_ms = max(hi - lo, 1e-9)
    for e in boxes:
        if e.get("cat") == "host" and e["name"] == "step":
            start, dur = e["ts"] / 1000.0, e["dur"] / 1000.0
            mid = (max(start, lo) + min(start + dur, hi)) / 2
            if lo <= mid <= hi:
                ax.text(mid, lane_of[e["tid"]], f"step {e.get('args', {}).get('index', '')}",
                        ha="center", va="center", fontsize=7, color="#333333")
    for e in boxes:
        if e.get("cat") not in ("recompute", "backward"):
            continue
        start, dur = e["ts"] / 1000.0, e["dur"] / 1000.0
        block = e.get("args", {}).get("block", -1)
        if block >= 0 and dur > 0.012 * span_ms and lo <= start <= hi:
            ax.text(start + dur / 2, lane_of[e["tid"]], str(block), ha="center", va="center",
                    fontsize=6, color="white")
    ax.set_yticks(range(len(tids)))
    ax.set_yticklabels([names.get(t, f"tid {t}") for t in reversed(tids)])
    ax.set_ylim(-0.6, len(tids) - 0.4)
    kinds_seen = sorted({k for k, _ in by_kind}, key=KIND_ORDER.index)
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in kinds_seen],
              loc="upper center", bbox_to_anchor=(0.5, 1.0 + 0.6 / len(tids)),
              ncol=len(kinds_seen), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    if args.title:
        fig.suptitle(args.title, fontsize=10)

    # Counter: a step function (the value holds until the next sample).
    if counters:
        ts = [c["ts"] / 1000.0 for c in counters]
        mib = 1.0 / (1 << 20)
        live = [c["args"].get("live", 0) * mib for c in counters]
        act = [c["args"].get("activations", 0) * mib for c in counters]
        axm.step(ts, live, where="post", color="#333333", linewidth=1.0, label="arena live")
        axm.step(ts, act, where="post", color=KIND_COLORS["recompute"], linewidth=1.0,
                 label="activations")
        axm.fill_between(ts, act, step="post", color=KIND_COLORS["recompute"], alpha=0.15)
        axm.set_ylabel("MiB")
        axm.legend(loc="upper right", fontsize=8, frameon=False)
        axm.set_ylim(bottom=0)
    else:
        axm.text(0.5, 0.5, "no 'arena bytes' counter in this trace", ha="center",
                 va="center", transform=axm.transAxes)
    axm.grid(alpha=0.3)
    axm.set_xlabel("time (ms)")
    axm.set_xlim(lo, hi)

    out = args.out or (args.trace[:-5] if args.trace.endswith(".json") else args.trace) + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
