"""``runs/<run_id>/report.html``: one self-contained page per run.

Everything is inlined (PNG images as data URIs, CSS in the page), so the file opens from the file
system, can be mailed or attached to a ticket, and needs no server. Sections: the steps and their
status; the pictures the stages wrote (reconstructions, samples, ...); loss curves drawn from the
stages' metric histories; a comparison table of the priors (a prior sweep's result); and every
step's final metrics.

Curves are drawn with Pillow (already a dependency) rather than matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

# history keys worth a curve, in display order; the first ones found per step are drawn
# (pretrain_recon: the TD-VAE's frame-VAE pre-training phase)
CURVE_KEYS = (
    "loss",
    "recon",
    "pretrain_recon",
    "bits_per_code",
    "ce",
    "kl",
    "commitment",
    "capacity",
    "lr",
)
MAX_CURVES_PER_STEP = 4


def write_report(path: Path, record: dict, metrics: dict, histories: dict, images: dict) -> None:
    """Writes the report page.

    Args:
        path: Target file (``report.html``).
        record: The run record (``run.json`` content).
        metrics: step name -> final metrics.
        histories: step name -> list of metric rows (``step`` plus numbers).
        images: step name -> list of PNG file paths.
    """
    steps = record["steps"]
    parts = [
        f"<h1>{_e(record['pipeline'])} &middot; run {_e(record['run_id'])}</h1>",
        f"<p>status <b>{_e(record['status'])}</b> &middot; {record['seconds']:.1f} s &middot; "
        f"store <code>{_e(record['store'])}</code> &middot; host {_e(record['host'])}</p>",
        _steps_table(steps),
    ]
    evaluations = {
        n: metrics[n] for n, s in steps.items() if s.get("stage") == "evaluate" and n in metrics
    }
    if evaluations:
        parts += ["<h2>Sample quality</h2>", _quality_table(evaluations)]
    pictures = [(name, p) for name, paths in images.items() for p in paths]
    if pictures:
        parts.append("<h2>Images</h2>")
        for name, png in pictures:
            parts.append(
                f"<figure><img src='{_png_uri(Path(png).read_bytes())}'>"
                f"<figcaption>{_e(name)}: {_e(Path(png).name)}</figcaption></figure>"
            )
    analyses = {
        n: s for n, s in steps.items() if s.get("stage") == "analyze_latents" and n in metrics
    }
    if analyses:
        parts += ["<h2>Autoencoders</h2>", _autoencoders_table(analyses, metrics)]
    rollouts = {
        n: metrics[n] for n, s in steps.items() if s.get("stage") == "rollout" and n in metrics
    }
    for name, values in rollouts.items():
        parts += [f"<h2>Predictions ({_e(name)})</h2>", _predictions_table(values)]
    priors = {n: s for n, s in steps.items() if s.get("stage") == "train_prior" and n in metrics}
    if priors:
        parts += ["<h2>Priors</h2>", _priors_table(priors, metrics)]
    curves = [(name, key, rows) for name, rows in histories.items() for key in _curve_keys(rows)]
    if curves:
        parts.append("<h2>Training curves</h2><div class='curves'>")
        for name, key, rows in curves:
            points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            values = [y for _, y in points]
            wide = bool(values) and min(values) > 0 and max(values) / min(values) > 20
            png = line_chart(points, f"{name}: {key}" + (" (log)" if wide else ""), log_y=wide)
            parts.append(f"<img src='{_png_uri(png)}'>")
        parts.append("</div>")
    parts.append("<h2>Metrics</h2>")
    for name, values in metrics.items():
        parts.append(f"<h3>{_e(name)}</h3>{_metrics_table(values)}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{_e(record['pipeline'])} {_e(record['run_id'])}</title><style>{_CSS}</style>"
        f"</head><body>{''.join(parts)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}th{background:#f3f3f3}figure{display:inline-block;margin:0 1em 1em 0}
img{image-rendering:pixelated;border:1px solid #ddd}figcaption{font-size:13px;color:#555}
.curves img{margin:0 .5em .5em 0}code{font-size:13px}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _steps_table(steps: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td>{_e(s.get('stage'))}</td><td>{_e(s.get('status'))}</td>"
        f"<td>{s.get('seconds', 0):.1f}</td><td><code>{_e(str(s.get('key', ''))[:12])}</code></td>"
        f"<td>{_e(s.get('error') or '')}</td></tr>"
        for n, s in steps.items()
    )
    return (
        "<table><tr><th>step</th><th>stage</th><th>status</th><th>seconds</th><th>artifact</th>"
        f"<th>error</th></tr>{rows}</table>"
    )


QUALITY_KEYS = (
    ("class_accuracy", "class-conditional samples assigned to their class"),
    ("classifier_accuracy", "classifier accuracy on held-out real images"),
    ("frechet_distance", "Fréchet distance, samples vs held-out real (classifier features)"),
    ("frechet_distance_recon", "... reconstructions vs real (what a perfect prior reaches)"),
    ("frechet_distance_real", "... real vs real, two halves (the noise floor)"),
    ("recon_mse", "autoencoder reconstruction MSE on held-out images"),
)


def _quality_table(evaluations: dict) -> str:
    rows = []
    for name, m in evaluations.items():
        for key, meaning in QUALITY_KEYS:
            if key in m:
                rows.append(
                    f"<tr><td>{_e(name)}</td><td>{_e(meaning)}</td><td>{_fmt(m[key])}</td></tr>"
                )
        for key in sorted(k for k in m if k.startswith("val_bits_per_code/")):
            rows.append(
                f"<tr><td>{_e(name)}</td><td>prior bits per code on val, level "
                f"{_e(key.split('/', 1)[1])}</td><td>{_fmt(m[key])}</td></tr>"
            )
    note = (
        "<p><small>The Fréchet distances use the penultimate features of this run's small "
        "classifier, not Inception: they are not FID and compare only with runs that use the "
        "same classifier artifact.</small></p>"
    )
    return (
        f"<table><tr><th>step</th><th>figure</th><th>value</th></tr>{''.join(rows)}</table>{note}"
    )


def _priors_table(priors: dict, metrics: dict) -> str:
    head = (
        "<tr><th>step</th><th>level</th><th>hidden</th><th>layers</th><th>heads</th><th>patch</th>"
        "<th>lr</th>"
        "<th>steps</th><th>parameters</th><th>train bits/code</th><th>val bits/code</th>"
        "<th>tokens/s</th></tr>"
    )
    rows = []
    for name, step in sorted(priors.items(), key=lambda kv: str(metrics[kv[0]].get("level"))):
        config, m = step.get("config", {}), metrics[name]
        model, train = config.get("model", {}), config.get("train", {})
        cells = [
            name,
            m.get("level"),
            model.get("hidden_size"),
            model.get("layers"),
            model.get("heads")
            if not model.get("kv_heads")
            else f"{model.get('heads')} (kv {model['kv_heads']})",
            "x".join(str(p) for p in model.get("patch", [1, 1])),
            train.get("lr"),
            train.get("steps"),
            f"{m.get('parameters', 0) / 1e6:.2f}M",
            _fmt(m.get("train_bits_per_code")),
            _fmt(m.get("val_bits_per_code")),
            _fmt(m.get("tokens_per_s")),
        ]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


AUTOENCODER_COLUMNS = (
    ("val recon (nats)", "autoencoder", "val_recon"),
    ("val MSE", "autoencoder", "val_mse"),
    ("-ELBO (nats)", "analysis", "neg_elbo"),
    ("IW-NLL (nats)", "analysis", "iw_nll"),
    ("k", "analysis", "iw_samples"),
    ("active units", "analysis", "active_units"),
    ("linear probe acc.", "analysis", "probe_accuracy"),
    ("MIG", "analysis", "mig"),
    ("FactorVAE score", "analysis", "factor_vae_score"),
)


def _autoencoders_table(analyses: dict, metrics: dict) -> str:
    """One row per analyze_latents step, with its autoencoder's val figures beside it."""
    head = "<tr><th>step</th><th>family</th><th>latent dims</th>" + "".join(
        f"<th>{_e(title)}</th>" for title, _, _ in AUTOENCODER_COLUMNS
    )
    rows = []
    for name, step in analyses.items():
        source = (step.get("inputs") or {}).get("autoencoder")
        found = {"analysis": metrics[name], "autoencoder": metrics.get(source, {})}
        cells = [
            source or name,
            found["analysis"].get("family"),
            found["analysis"].get("latent_dim"),
        ]
        cells += [_fmt(found[where].get(key)) for _, where, key in AUTOENCODER_COLUMNS]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    note = (
        "<p><small>val recon: the reconstruction term in nats per image (Bernoulli or unit "
        "Gaussian); IW-NLL: importance-weighted NLL with k samples (VAE-type models); active "
        "units: latent dimensions with variance above 0.01 over the val codes.</small></p>"
    )
    return f"<table>{head}</tr>{''.join(rows)}</table>{note}"


def _predictions_table(values: dict) -> str:
    """A rollout step's per-jump errors: the model next to its two baselines."""
    who = (("model", "model"), ("copy_last", "copy last frame"), ("mean_frame", "mean frame"))
    head = "<tr><th>Δ</th>" + "".join(f"<th>BCE {t}</th>" for _, t in who)
    head += "".join(f"<th>MSE {t}</th>" for _, t in who) + "</tr>"
    rows = []
    for r in values.get("per_delta", []):
        cells = [r["delta"]] + [_fmt(r[f"{k}_{m}"]) for m in ("bce", "mse") for k, _ in who]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    note = (
        f"<p><small>{_e(values.get('sequences'))} held-out {_e(values.get('split'))} sequences; "
        f"{_e(values.get('context'))} observed frames, then frame k-1+Δ predicted with one jump "
        f"of size Δ (mean of {_e(values.get('samples'))} samples). BCE in nats per frame, MSE "
        f"per pixel. Negative TD-VAE bound: {_fmt(values.get('val_bound'))} nats per predicted "
        "frame.</small></p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _metrics_table(values: dict) -> str:
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = json.dumps(value) if len(json.dumps(value)) < 120 else f"[{len(value)} items]"
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e(_fmt(value))}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _curve_keys(rows: list) -> list[str]:
    if not rows or not isinstance(rows[0], dict):
        return []
    present = [k for k in CURVE_KEYS if any(_finite(r.get(k)) for r in rows)]
    return present[:MAX_CURVES_PER_STEP]


def line_chart(
    points: list[tuple[float, float]],
    title: str,
    size: tuple[int, int] = (380, 230),
    log_y: bool = False,
) -> bytes:
    """A PNG line chart of (x, y) points with min / max labels on both axes."""
    return lines_chart([points], title, size, log_y)


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def lines_chart(
    series: list[list[tuple[float, float]]],
    title: str,
    size: tuple[int, int] = (380, 230),
    log_y: bool = False,
) -> bytes:
    """A PNG chart of one line per series of (x, y) points (colours in `COLORS` order, then
    grey), with min / max labels on both axes."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 58, 12, 24, 28
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), title, fill="black")
    if log_y:
        series = [[(x, math.log10(y)) for x, y in points if y > 0] for points in series]
    every = [p for points in series for p in points]
    if not every:
        draw.text((left, height // 2), "no data", fill="gray")
        return _png_bytes(image)
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - top - bottom
    to_px = lambda x, y: (  # noqa: E731
        left + (x - x0) / (x1 - x0) * plot_w,
        top + (1 - (y - y0) / (y1 - y0)) * plot_h,
    )
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="#999")
    label = (lambda v: f"1e{v:.1f}") if log_y else (lambda v: f"{v:.4g}")
    draw.text((4, top - 4), label(y1), fill="black")
    draw.text((4, top + plot_h - 8), label(y0), fill="black")
    draw.text((left, top + plot_h + 6), f"{x0:g}", fill="black")
    draw.text((left + plot_w - 40, top + plot_h + 6), f"{x1:g}", fill="black")
    for index, points in reversed(list(enumerate(series))):  # the first series drawn on top
        color = COLORS[index] if index < len(COLORS) else "#bbbbbb"
        if len(points) == 1:
            x, y = to_px(*points[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        elif points:
            draw.line([to_px(x, y) for x, y in points], fill=color, width=2)
    return _png_bytes(image)


def write_sweep_report(path: Path, record: dict) -> None:
    """A sweep's page (`pipeline.tune`): the trials ranked, the metric at every checkpoint of
    every trial in one chart (the best first, in the table's colours), their train curves."""
    metric, trials = record["metric"], record["trials"]
    names = sorted({k for t in trials for k in t["values"]})
    head = (
        "<tr><th></th><th>trial</th><th>status</th><th>steps</th>"
        + "".join(f"<th>{_e(n)}</th>" for n in names)
        + f"<th>{_e(metric)}</th><th>artifact</th></tr>"
    )
    rows = []
    for rank, t in enumerate(trials):
        swatch = COLORS[rank] if rank < len(COLORS) else "#bbbbbb"
        cells = [
            f"<td style='background:{swatch}'></td>",
            f"<td>{_e(t['trial'])}</td>",
            f"<td>{_e(t['status'] + (' (committed)' if t.get('committed') else ''))}</td>",
            f"<td>{t['steps']}</td>",
            *(f"<td>{_e(_fmt(t['values'].get(n)))}</td>" for n in names),
            f"<td>{_e(_fmt(t['metric']))}</td>",
            f"<td><code>{_e(str(t['key'])[:12])}</code></td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    series = [
        [(c["step"], c[metric]) for c in t["checkpoints"] if _finite(c.get(metric))] for t in trials
    ]
    curves = []
    for t in trials[: len(COLORS)]:
        keys = _curve_keys(t["curve"])[:1]
        for key in keys:
            points = [(r["step"], r[key]) for r in t["curve"] if _finite(r.get(key))]
            curves.append(line_chart(points, f"{t['trial']}: {key}"))
    parts = [
        f"<h1>sweep {_e(record['sweep'])} &middot; run {_e(record['run_id'])}</h1>",
        f"<p>{len(trials)} trials, {record['steps_trained']} steps trained in all, "
        f"{record['seconds']:.1f} s &middot; ranked by {_e(metric)} ({_e(record['mode'])}) "
        f"&middot; store <code>{_e(record['store'])}</code> &middot; host {_e(record['host'])}</p>",
        f"<table>{head}{''.join(rows)}</table>",
        f"<h2>{_e(metric)} at each checkpoint</h2>",
        f"<img src='{_png_uri(lines_chart(series, metric, size=(640, 320)))}'>",
    ]
    if curves:
        parts.append("<h2>Training curves</h2><div class='curves'>")
        parts += [f"<img src='{_png_uri(png)}'>" for png in curves]
        parts.append("</div>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>sweep {_e(record['sweep'])}</title><style>{_CSS}</style>"
        f"</head><body>{''.join(parts)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
