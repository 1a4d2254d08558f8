"""Figures of a concept-space analysis (PNG, and an animated GIF), for image and vector runs.

Every function takes the dict written by ``analyze.analyze_run`` (and, where samples are drawn,
what ``analyze.shown_samples`` read of one member's) and writes one file; none reads a run:

    trajectories.png      the classes' paths through concept space for every member: training
                          classes dashed, held-out solid, coloured by the swept separation, our
                          turns starred, the reference's marker (training classes saturated) a
                          red X; corner thumbnails of each class's final samples (images) or a
                          scatter of one member's final samples (vectors)
    accuracy.png          joint accuracy per class vs step, one panel per class
    learning_times.png    the held-out class's learning time per concept vs its concept signal
                          (mean and spread over seeds; open triangles: some seeds never learned),
                          the measure named in the title
    trajectories.gif      the trajectories growing over training beside the samples at each step
    sweep.png             (a sweep) the held-out class's learning time against a swept field, coloured
                          by another, a panel per setting of the rest (``sweep_figure``)

Besides: ``data_grid`` / ``data_scatter`` (``jaxconcept data --show``: image examples per class, or
vector examples in concept space). The figures of elicitation are in ``jaxconcept.elicit.plots``.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import animation as mpl_animation
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from jaxconcept import store

# Figures are built as matplotlib.figure.Figure objects and saved, never through pyplot: no
# backend is chosen and no global figure state is touched, whatever the importing program uses.
CLASS_COLOURS = matplotlib.colormaps["tab10"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _xy(points) -> np.ndarray:
    """Concept coordinates [..., n_concepts] -> the two plotted axes [..., 2] (first two concepts;
    a single concept is plotted against zero)."""
    points = np.asarray(points, np.float64)
    if points.shape[-1] >= 2:
        return points[..., :2]
    return np.concatenate([points, np.zeros_like(points)], axis=-1)


def _colour_map(analysis):
    vals = np.asarray(analysis["colour_by"]["values"], np.float64)
    norm = matplotlib.colors.Normalize(vals.min(), vals.max() if vals.max() > vals.min() else vals.min() + 1)
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(norm(v)) for v in vals], matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


def _concept_axes(ax, analysis):
    cs, vn = analysis["concepts"], analysis["value_names"]
    ax.set_xlabel(f"{cs[0]}: {vn[0][0]} -> {vn[0][-1]}")
    ax.set_ylabel(f"{cs[1]}: {vn[1][0]} -> {vn[1][-1]}" if len(cs) > 1 else "")
    ax.set_xlim(-0.55, 1.55)
    ax.set_ylim(-0.55, 1.55)
    ax.set_aspect("equal")
    ax.plot([0, 1, 1, 0, 0], [0, 0, 1, 1, 0], color="0.85", lw=0.8, zorder=0)


def _grid_image(imgs, ncol: int = 2) -> np.ndarray:
    """[n, H, W, 3] -> one [rows*H, ncol*W, 3] mosaic with 1-pixel white gutters."""
    n, h, w, _ = imgs.shape
    rows = -(-n // ncol)
    out = np.ones((rows * (h + 1) - 1, ncol * (w + 1) - 1, 3), np.float32)
    for k in range(n):
        r, c = divmod(k, ncol)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = imgs[k]
    return np.clip(out, 0, 1)


def _draw_trajectories(ax, analysis, colours, upto: int | None = None):
    held = set(analysis["held_out"])
    names = analysis["class_names"]
    for i, m in enumerate(analysis["members"]):
        for c, name in enumerate(names):
            xy = _xy(m["coords"][name])[: upto]
            ax.plot(xy[:, 0], xy[:, 1], ls="-" if c in held else "--", lw=1.6 if c in held else 0.9,
                    color=colours[i], alpha=0.9 if c in held else 0.5)
            ax.plot(xy[-1, 0], xy[-1, 1], "o", ms=3, color=colours[i])
        for name, t in m["turn"].items():
            if t["index"] is not None and (upto is None or t["index"] < upto) and t["turned"]:
                p = _xy(m["coords"][name][t["index"]])
                ax.plot(p[0], p[1], "*", ms=11, mfc=colours[i], mec="k", mew=0.7, zorder=5)
            sat = m.get("saturation")
            if sat is not None and sat in analysis["steps"]:  # the reference's marker: training classes saturated
                k = analysis["steps"].index(sat)
                if upto is None or k < upto:
                    p = _xy(m["coords"][name][k])
                    ax.plot(p[0], p[1], "X", ms=8, mfc="C3", mec="k", mew=0.6, zorder=6)


def _label_corners(ax, analysis):
    corners = _xy(analysis["corners"])
    held = set(analysis["held_out"])
    for c, name in enumerate(analysis["class_names"]):
        x, y = corners[c]
        ax.annotate(name + (" (held out)" if c in held else ""), (x, y), xytext=(0, -10 if y < 0.5 else 10),
                    textcoords="offset points", ha="center", fontsize=7, color="C3" if c in held else "0.3")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def trajectories(analysis: dict, shown: dict, path) -> Path:
    """Concept-space trajectories of every member (see module docstring), with the last samples of
    ``shown`` (``analyze.shown_samples``). Returns ``path``."""
    colours, sm = _colour_map(analysis)
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    _concept_axes(ax, analysis)
    if analysis["kind"] != "vector":  # thumbnails of each class's final samples, outside its corner
        samples = shown["samples"][-1][:, :4]
        for c, (x, y) in enumerate(_xy(analysis["corners"])):
            mosaic = _grid_image(samples[c])
            im = OffsetImage(mosaic, zoom=56.0 / mosaic.shape[1])  # about 56 pixels wide at any image size
            ax.add_artist(AnnotationBbox(im, (x, y), xybox=(x + (0.3 if x > 0.5 else -0.3),
                                                             y + (0.3 if y > 0.5 else -0.3)),
                                         frameon=True, pad=0.1, arrowprops=dict(arrowstyle="-", color="0.6")))
    else:  # a scatter of one member's final samples
        z = _xy(shown["samples"][-1])
        for c in range(z.shape[0]):
            ax.scatter(z[c, :, 0], z[c, :, 1], s=4, alpha=0.35, color=CLASS_COLOURS(c), lw=0, zorder=1)
    _draw_trajectories(ax, analysis, colours)
    _label_corners(ax, analysis)
    fig.colorbar(sm, ax=ax, label=analysis["colour_by"]["field"], shrink=0.8)
    ax.set_title(f"{analysis.get('name') or 'run'}: concept space (held out solid, training dashed;\n"
                 "* our turn, red X training classes saturated)", fontsize=9)
    return save(fig, path)


def accuracy(analysis: dict, path) -> Path:
    """Joint accuracy of each class vs step, one panel per class, a line per member."""
    colours, sm = _colour_map(analysis)
    names = analysis["class_names"]
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.6 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    steps = np.asarray(analysis["steps"])
    for c, name in enumerate(names):
        ax = axes.flat[c]
        for i, m in enumerate(analysis["members"]):
            ax.plot(steps, m["accuracy"][name]["joint"], color=colours[i], lw=1.2)
        ax.axhline(analysis["threshold"], color="0.5", ls=":", lw=1)
        if steps[0] > 0 and len(steps) > 1:
            ax.set_xscale("log")
        ax.set_title(name + (" (held out)" if c in analysis["held_out"] else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.03, 1.03)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("accuracy (all concepts)")
    fig.colorbar(sm, ax=axes, label=analysis["colour_by"]["field"], shrink=0.8)
    return save(fig, path)


def learning_times(analysis: dict, path) -> Path:
    """Learning time per concept vs concept signal: held-out classes (coloured) and the mean over
    training classes (grey); mean +- std over the seeds that learned, seeds as dots, open triangles
    at the top for groups where some seed never learned (censored at the run length). The title
    names the learning-time measure (``analysis["definition"]``)."""
    concepts = analysis["concepts"]
    fig = Figure(figsize=(4.4 * len(concepts), 3.4))
    axes = fig.subplots(1, len(concepts), squeeze=False, gridspec_kw={"wspace": 0.35})
    top = analysis["steps"][-1]
    names = analysis["class_names"]
    for j, con in enumerate(concepts):
        ax = axes[0, j]
        use_signal = all(r["signal"] is not None for r in analysis["summary"][names[0]][con])
        for k, c in enumerate(analysis["held_out"] + [None]):
            cls = [names[c]] if c is not None else [names[t] for t in analysis["train_classes"]]
            rows = [analysis["summary"][n][con] for n in cls]
            x = np.array([r["signal"] if use_signal else (r["separation"] or 0.0) for r in rows[0]], np.float64)
            times = np.array([[np.nan if t is None else t for t in r["times"]] for r in rows[0]], np.float64)
            if c is None:  # training classes: average over classes first
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    times = np.nanmean(np.stack([[[np.nan if t is None else t for t in r["times"]] for r in rs]
                                                 for rs in rows]), axis=0) if len(rows) else times
            colour = "0.55" if c is None else CLASS_COLOURS(3 + k)
            label = "training classes (mean)" if c is None else names[c]
            with warnings.catch_warnings():  # an all-missing row is a NaN mean, drawn as a triangle
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(times, axis=1), np.nanstd(times, axis=1)
            ok = np.isfinite(mean)
            ax.errorbar(x[ok], mean[ok], yerr=std[ok], fmt="o-", ms=4, color=colour, capsize=2, label=label)
            for g in range(len(x)):
                ax.plot(np.full(times.shape[1], x[g]), times[g], ".", ms=3, color=colour, alpha=0.5)
            miss = np.isnan(times).any(axis=1)
            if miss.any():
                ax.plot(x[miss], np.full(miss.sum(), top), "^", mfc="none", color=colour, ms=7)
        ax.set_xlabel(f"concept signal ({con})" if use_signal else f"separation ({con})")
        ax.set_ylabel(f"learning time of {con} (step)")
        ax.axhline(top, color="0.8", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    definition = analysis.get("definition", f"first step with accuracy >= {analysis['threshold']}")
    fig.suptitle(f"learning time vs concept signal\n{definition}", fontsize=8)
    return save(fig, path)


def animate(analysis: dict, shown: dict, path, fps: int = 4) -> Path:
    """Animated GIF: trajectories up to each frame's checkpoint beside its samples (``shown``:
    ``analyze.shown_samples``; vectors as concept coordinates)."""
    steps, frames, member = analysis["steps"], shown["frames"], shown["member"]
    colours, _ = _colour_map(analysis)
    names = analysis["class_names"]
    images = analysis["kind"] != "vector"
    shown = shown["samples"] if images else [_xy(s) for s in shown["samples"]]
    fig = Figure(figsize=(9.6, 4.6))
    ax, ax2 = fig.subplots(1, 2)

    def draw(f):
        ax.clear()
        ax2.clear()
        _concept_axes(ax, analysis)
        _draw_trajectories(ax, analysis, colours, upto=frames[f] + 1)
        _label_corners(ax, analysis)
        ax.set_title(f"step {steps[frames[f]]}", fontsize=10)
        s = shown[f]
        if images:
            ax2.imshow(_grid_image(s.reshape(-1, *s.shape[2:]), ncol=s.shape[1]))
            ax2.set_yticks((np.arange(len(names)) + 0.5) * (s.shape[2] + 1))
            ax2.set_yticklabels(names, fontsize=8)
            ax2.set_xticks([])
        else:
            _concept_axes(ax2, analysis)
            for c in range(s.shape[0]):
                ax2.scatter(s[c, :, 0], s[c, :, 1], s=5, alpha=0.5, color=CLASS_COLOURS(c), lw=0, label=names[c])
            ax2.legend(fontsize=7, loc="center")
        ax2.set_title(f"member {member}: samples per class", fontsize=10)

    draw(0)
    fig.tight_layout()
    anim = mpl_animation.FuncAnimation(fig, draw, frames=len(frames))
    with tempfile.TemporaryDirectory() as tmp:  # Pillow writes a file by name; then copied whole into place
        anim.save(Path(tmp) / "a.gif", writer=mpl_animation.PillowWriter(fps=fps), dpi=70)
        with store.atomic(path, "wb") as f:
            f.write((Path(tmp) / "a.gif").read_bytes())
    return store.path(path)


def _numbers(vals) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def sweep_axes(analysis: dict, by: str | None = None, colour: str | None = None) -> tuple[str, str | None, list]:
    """(x field, colour field or None, panel fields) of ``sweep_figure``: ``by`` (default: the
    first swept field with numbers outside the data section, else the first with numbers),
    ``colour`` (default: the first other swept field, preferring a data field), and one panel per
    combination of the swept fields left (the seed apart). Raises ValueError: a field not swept,
    or no swept field with numbers."""
    swept = [f for f in analysis.get("swept", []) if f != "seed"] + ["seed"]
    by, colour = ("seed" if f == "seeds" else f for f in (by, colour))  # the config's axis is "seeds"
    vals = {f: [m["values"].get(f) for m in analysis["members"]] for f in swept}
    numeric = [f for f in swept if f != "seed" and _numbers(vals[f])]
    for name, f in (("by", by), ("colour", colour)):
        if f is not None and f not in swept:
            raise ValueError(f"--{name}={f!r}: not a swept field of this run; allowed {', '.join(swept)}")
    if by is None:
        if not numeric:
            raise ValueError("no swept field with numbers to plot learning time against")
        by = next((f for f in numeric if not f.startswith("data.")), numeric[0])
    if colour is None:
        rest = [f for f in swept if f not in (by, "seed")]
        colour = next((f for f in rest if f.startswith("data.")), rest[0] if rest else None)
    panels = [f for f in swept if f not in (by, colour, "seed")]
    return by, colour, panels


def sweep_figure(analysis: dict, path, by: str | None = None, colour: str | None = None) -> Path:
    """Learning time of the first held-out class (joint accuracy) against a swept field, a point
    per member (``sweep_axes``: x ``by``, coloured by ``colour``, a panel per setting of the other
    swept fields; each colour shifted sideways by ~1 % of the axis, so equal times stay visible);
    members that never learned are open triangles at the run's last step; the x axis is
    logarithmic where ``by`` spans a factor of 10 or more. Returns ``path``."""
    by, colour, panels = sweep_axes(analysis, by, colour)
    held = analysis["class_names"][analysis["held_out"][0]]
    top = analysis["steps"][-1]
    ms = analysis["members"]
    keys = sorted({tuple(str(m["values"].get(f)) for f in panels) for m in ms})
    fig = Figure(figsize=(4.4 * len(keys), 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False, sharey=True)
    cvals = [m["values"].get(colour) for m in ms] if colour else [0] * len(ms)
    order = sorted({str(v) for v in cvals})  # the colour groups (each shifted sideways a little)
    if colour and _numbers(cvals):
        lo, hi = min(cvals), max(cvals)
        norm = matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1)
        cmap = matplotlib.colormaps["viridis"]
        pick = lambda v: cmap(norm(v))  # noqa: E731
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=colour, shrink=0.8)
    else:
        pick = lambda v: CLASS_COLOURS(order.index(str(v)) % 10)  # noqa: E731
    for ax, key in zip(axes[0], keys):
        mine = [m for m in ms if tuple(str(m["values"].get(f)) for f in panels) == key]
        xs = [m["values"].get(by) for m in mine]
        log = min(xs) > 0 and max(xs) >= 10 * min(xs)
        step = (math.log10(max(xs) / min(xs)) if log else (max(xs) - min(xs)) or 1.0) * 0.012
        for m in mine:
            t = m["learning_time"][held]["joint"]
            v = m["values"].get(colour) if colour else 0
            shift = step * (order.index(str(v)) - (len(order) - 1) / 2)
            x, c = m["values"].get(by), pick(v)
            x = x * 10 ** shift if log else x + shift
            ax.plot(x, top if t is None else t, "^" if t is None else "o", ms=6, mfc="none" if t is None else c,
                    color=c, alpha=0.85)
        if log:
            ax.set_xscale("log")
        ax.axhline(top, color="0.8", lw=0.8, ls=":")
        ax.set_xlabel(by)
        ax.set_title(", ".join(f"{f}={v}" for f, v in zip(panels, key)) or f"{len(mine)} members", fontsize=8)
    if colour and not _numbers(cvals):
        for v in order:
            axes[0, 0].plot([], [], "o", color=pick(v), label=f"{colour}={v}")
        axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel(f"learning time of {held} (step)")
    fig.suptitle(f"learning time (joint accuracy >= {analysis['threshold']}) vs {by}; open triangles: never",
                 fontsize=10)
    return save(fig, path)


def all_figures(analysis: dict, shown: dict, out_dir, by: str | None = None, colour: str | None = None) -> list[Path]:
    """Every figure of an analysis (``analyze.analyze_run``) and one member's samples (``shown``:
    ``analyze.shown_samples``) into ``out_dir`` (a run's is RUN_DIR/figures); for a sweep with a
    swept field of numbers, also sweep.png (``sweep_figure``: ``by``, ``colour``). Returns their paths."""
    out = store.path(out_dir)
    figs = [trajectories(analysis, shown, out / "trajectories.png"), accuracy(analysis, out / "accuracy.png"),
            learning_times(analysis, out / "learning_times.png"), animate(analysis, shown, out / "trajectories.gif")]
    swept = [f for f in analysis.get("swept", []) if f != "seed"]
    if by is not None or any(_numbers([m["values"].get(f) for m in analysis["members"]]) for f in swept):
        figs.append(sweep_figure(analysis, out / "sweep.png", by, colour))
    return figs


def save(fig, path) -> Path:
    """Write ``fig`` whole (``store.atomic``: a local file or a bucket object), in the format of
    the path's suffix."""
    with store.atomic(path, "wb") as f:
        fig.savefig(f, format=store.path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    return store.path(path)


def data_grid(spec, x, labels, path, per_class: int = 8) -> Path:
    """A grid of rendered image examples [N, H, W, 3]: one row per class (labelled), x horizontal,
    y up. Vector data (``spec.kind == "vector"``) is drawn by ``data_scatter`` instead."""
    if spec.kind == "vector":
        return data_scatter(spec, x, labels, path)
    fig = Figure(figsize=(per_class * 1.1, spec.n_classes * 1.15))
    axes = fig.subplots(spec.n_classes, per_class, squeeze=False)
    for c in range(spec.n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(idx):
                ax.imshow(np.clip(np.transpose(x[idx[j]], (1, 0, 2)), 0, 1), origin="lower")
        held = " (held out)" if c in spec.held_out else ""
        axes[c, 0].set_ylabel(f"{spec.class_names[c]}{held}", rotation=0, ha="right", va="center", fontsize=8)
    return save(fig, path)


def data_scatter(spec, x, labels, path) -> Path:
    """Vector examples [N, dim + dim_nuisance] in concept space: the first two concept coordinates
    (one concept: against zero) as drawn, one colour per class, held-out classes as crosses."""
    z = _xy(np.asarray(x)[:, : len(spec.concepts)])
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.subplots()
    for c, name in enumerate(spec.class_names):
        held = c in spec.held_out
        pts = z[np.asarray(labels) == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=14 if held else 8, marker="x" if held else "o", lw=0.8 if held else 0,
                   alpha=0.7, color=CLASS_COLOURS(c % 10), label=name + (" (held out)" if held else ""))
    ax.set_xlabel(spec.concepts[0])
    ax.set_ylabel(spec.concepts[1] if len(spec.concepts) > 1 else "")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(f"{len(z)} examples of {spec.n_classes} classes in concept space", fontsize=9)
    return save(fig, path)
