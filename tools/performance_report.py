"""Regenerate the README's measured results from the JSON recorded under benchmarks/.

    python tools/performance_report.py          # rewrite README.md, docs/results.md and the chart
    python tools/performance_report.py --check  # exit 1 if either is out of date

Every benchmark tool writes one JSON with its figures, machine, versions, commit and
command; this turns each kind into a table row with that provenance, so the README
never states a number that is not on disk. Kinds are recognised by their keys (see
RENDERERS); a JSON of an unknown kind is listed by name so that it is not silently
dropped. The chart (benchmarks/performance.svg) plots the ratios that read better as
bars: loader images/s and loss time, each against the published way of doing it.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import readme_sections

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
CHART = BENCHMARKS / "performance.svg"
RESULTS = ROOT / "docs" / "results.md"
START = "<!-- performance:start -->"
END = "<!-- performance:end -->"


def _machine(record: dict) -> str:
    machine = record.get("machine") or {}
    gpu = machine.get("gpu") or machine.get("gpu_name")
    if not gpu and str(record.get("device", "")).startswith("cuda"):
        gpu = record.get("device_name")
    cpu = machine.get("cpu") or record.get("cpu_model") or "?"
    cores = machine.get("cores") or record.get("cpu_count")
    text = f"{gpu}" if gpu else f"{cpu}, {cores} cores" if cores else cpu
    return text


def _command(record: dict) -> str:
    """The recorded command as run from the repository root, whichever machine ran it."""
    command = record.get("command", "?")
    command = re.sub(r"^\S*/python[\d.]*(?=\s)", "python", command)  # the interpreter's path
    command = re.sub(r"(?<![\w.])/\S*?/(?=(tools|data|benchmarks|configs|runs)/)", "", command)  # the checkout's
    if not command.startswith("python"):
        command = "python " + command
    return f"`{command}`"


def _num(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


# ------------------------------------------------------------------------- per kind
def loss_row(name: str, r: dict) -> list[str]:
    s = r["shape"]
    ms, mib, ratios = r["median_ms"], r["peak_extra_memory_mib"], r["ratios"]
    what = (f"CARP loss fwd+bwd, {r['dtype']}, {r['device']}, Vs={s['views_student']} Vt={s['views_teacher']} "
            f"B={s['batch']} K={s['prototypes']:,} P={s['partition_size']}, {r.get('torch_threads', '?')} thread(s)")
    # A record may time only some of the formulations (a short rerun on a GPU machine).
    others = [f"{impl} {_num(ms[impl])} ms ({ratios[f'{impl}_time_over_fused']:.1f}×)"
              for impl in ("reference", "compiled", "published") if impl in ms]
    result = f"fused {_num(ms['fused'])} ms" + (" vs " + ", ".join(others) if others else "")
    detail = ""
    against = next((impl for impl in ("reference", "published") if mib.get(impl)), None)
    if mib.get("fused") is not None and against:
        detail += (f"peak extra memory {_num(mib['fused'])} vs {_num(mib[against])} MiB for the "
                   f"{against} ({mib['fused'] / mib[against]:.3f}; the student gradient alone is "
                   f"{_num(r.get('student_grad_mib'))} MiB)")
    roofline = r.get("roofline") or {}
    fused = roofline.get("kernels", {}).get("fused", {}).get("forward_backward")
    if fused:
        detail += (f"; fused kernels alone {fused['median_ms']:.3f} ms = "
                   f"{fused['bytes_per_s'] / 1e12:.2f} TB/s, {fused['of_copy_bandwidth']:.0%} of the "
                   f"{roofline['copy']['bytes_per_s'] / 1e12:.2f} TB/s copy bandwidth measured in the run"
                   + (f" ({fused['of_datasheet_peak']:.0%} of the datasheet peak)"
                      if fused.get("of_datasheet_peak") else ""))
    return [what, result, detail]


def loaders_row(name: str, r: dict) -> list[str]:
    ips, settings = r["images_per_s"], r["settings"]
    what = (f"FFCV producer vs the published torchvision loader, {settings['crops']}, "
            f"{settings['workers']} workers, batch {settings['batch_size']}")
    result = (f"{_num(ips['ffcv_producer']['median'])} vs {_num(ips['torchvision']['median'])} images/s "
              f"({r['ratios']['ffcv_producer_over_torchvision']:.1f}×); producer + augmentation on CPU "
              f"{_num(ips['ffcv_full']['median'])}")
    return [what, result]


def producer_row(name: str, r: dict) -> list[str]:
    settings, figures = r["settings"], r["figures"]
    what = (f"FFCV producer per core vs its decoder, the producer before ({settings['before_revision']}) and "
            f"the published torchvision loader, {settings['crops']}, {settings['workers']} workers, "
            f"batch {settings['batch_size']}")
    parts = [f"decode alone {_num(figures['decode_only']['images_per_cpu_s'])} images/s per core"]
    for beton, entry in r["summary"].items():
        stored = r["dataset"]["betons"][beton]["stored"]
        text = (f"{stored}: {_num(entry['producer_per_core'])} per core "
                f"({entry['share_of_decode_ceiling']:.0%} of decode)")
        if "before_per_core" in entry:
            text += f", {entry['producer_over_before_per_core']:.2f}× before ({_num(entry['before_per_core'])})"
        text += f", {entry['producer_over_torchvision_wall']:.1f}× torchvision"
        if "cores_per_gpu" in entry:
            text += f", {entry['cores_per_gpu']} cores per GPU"
        parts.append(text)
    return [what, "; ".join(parts)]


def resample_row(name: str, r: dict) -> list[str]:
    figures, pil = r["resample_us_per_photograph"], r["versions"]["pil"]
    what = (f"FFCV producer's resampler vs {pil} BICUBIC on the same boxes, {r['settings']['crops']}, "
            f"one thread")
    result = (f"{_num(figures['producer']['median'])} vs {_num(figures['pil']['median'])} µs per photograph "
              f"({pil.split()[0]} takes {figures['pil_over_producer']:.2f}× the producer's time)")
    return [what, result, f"worst PSNR producer vs PIL {r['worst_psnr_producer_vs_pil_db']} dB"]


def dali_row(name: str, r: dict) -> list[str]:
    res, setup = r["results"], r["setup"]
    what = (f"DALI producer (CPU mode, {setup['dali_threads']} threads) vs torchvision, {setup['crops']}, "
            f"batch {setup['batch_size']}")
    result = (f"{_num(res['dali_producer']['images_per_s_median'])} vs "
              f"{_num(res['torchvision']['images_per_s_median'])} images/s "
              f"({r['speedup_dali_producer_over_torchvision']['ratio_of_medians']:.1f}×)")
    return [what, result]


def soak_row(name: str, r: dict) -> list[str]:
    ips = r["images_per_s"]
    growth = ", ".join(f"{g:+.0f}" for g in r["rss_growth_after_warmup_mib_per_rank"])
    settings = dict(re.findall(r"(data\.batch_size|crops\.global_size|crops\.local_size)=(\d+)",
                               r.get("train_command", "")))
    shrunk = ", ".join(f"{k}={v}" for k, v in settings.items())
    what = (f"soak: 2-process DDP on CPU, {r['steps']:,} steps of the demo recipe"
            + (f" ({shrunk})" if shrunk else ""))
    result = (f"RSS growth after step {r['warmup_steps']}: {growth} MiB per rank; images/s median "
              f"{_num(ips['first_quarter_median'])} in the first quarter, {_num(ips['last_quarter_median'])} in the last")
    return [what, result]


def profile_row(name: str, r: dict) -> list[str]:
    shape = r["shape"]
    what = (f"profile, {r['device']}: {shape['arch']}, {shape['views']}, batch {shape['batch_per_process']}, "
            f"K={shape['prototypes']:,} P={shape['partition']}, amp {shape['amp']}")
    parts = [f"compute {_num(r['compute']['images_per_s'])} images/s"]
    if "images_per_s" in r.get("compute_compiled", {}):
        compiled = r["compute_compiled"]["images_per_s"]
        parts.append(f"with torch.compile(backbone) {_num(compiled)} images/s "
                     f"({compiled / r['compute']['images_per_s']:.2f}×)")
    if "baseline" in r:
        speedups = f"{r['speedup_over_baseline']:.2f}×"
        if "speedup_over_baseline_compiled" in r:
            speedups = f"eager {speedups}, compiled {r['speedup_over_baseline_compiled']:.2f}×"
        parts.append(f"published recipe {_num(r['baseline']['images_per_s'])} images/s "
                     f"(carp_fast speed-up {speedups})")
    for backend, entry in r.get("loaders", {}).items():
        if "images_per_s" in entry and backend != "synthetic":
            producer = entry.get("producer_images_per_s")
            parts.append(f"{backend} loader {_num(entry['images_per_s'])}"
                         + (f" (producer {_num(producer)})" if producer else "") + " images/s")
    # The compute figures are the headline; the loaders, the phase split and the verdict follow.
    headline = parts[:1 + ("images_per_s" in r.get("compute_compiled", {})) + ("baseline" in r)]
    details = parts[len(headline):]
    if "full_step" in r:
        share = r["full_step"].get("phase_share", {})
        details.append("full step " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    details.append(r["verdict"])
    return [what, "; ".join(headline), "; ".join(details)]


def check_row(name: str, r: dict) -> list[str]:
    compared = {k: v for k, v in r["comparisons"].items() if "ratio" in v}
    what = (f"profiler loader figures vs an independent timing ({r['config']}, tolerance "
            f"±{r['tolerance']:.0%})")
    cells = [f"{k.replace('.images_per_s', '').replace('_images_per_s', '')} {v['profiler']:.1f}/{v['independent']:.1f}"
             f" ({v['ratio']:.2f})" for k, v in compared.items()]
    result = "all agree" if r["passed"] else "NOT all agree"
    detail = f"profiler ran {r['profiler']['wall_s']:.0f} s; profiler/independent images/s: " + ", ".join(cells)
    return [what, result, detail]


def demo_row(name: str, r: dict) -> list[str]:
    knn = r["knn"]
    what = (f"`make demo`: {r['steps']} steps of {r['arch']}, {r['views']}, then 10-NN on "
            f"{knn['num_val']} held-out images ({knn['num_classes']} classes)")
    result = (f"training {r['train_wall_s'] / 60:.1f} min ({_num(r['images_per_s'])} images/s); "
              f"k-NN top-1 trained {knn['trained_top1']:.1f} % vs random init {knn['random_top1']:.1f} % "
              f"(chance {100 / knn['num_classes']:.1f} %)")
    return [what, result]


def suite_row(name: str, r: dict) -> list[str]:
    """carp_fast.eval.suite: each protocol's headline figure, the network against the others."""
    methods = list(r["results"])
    what = (f"evaluation suite ({r['spec'].rsplit('/', 1)[-1]}): {r['arch']} {r['which']}, "
            f"{' vs '.join(methods)}, on {', '.join(r['datasets'])}")

    def headline(protocol: str, v: dict) -> tuple[str, float] | None:
        if protocol == "knn":
            k = min(v["results"], key=int)
            return f"{k}-NN top-1", v["results"][k]["top1"]
        if protocol == "linear":
            return "linear top-1", v["top1"]
        if protocol == "kmeans":
            return "k-means NMI", v["nmi"]
        if protocol == "fewshot":
            shots = max(v["shots"], key=int)
            cost = next(iter(v["shots"][shots]["costs"].values()))
            return f"{shots}-shot mAP", cost["map"]["mean"]
        if protocol == "retrieval":
            return ("mAP@R", v["map@r"]) if "map@r" in v else ("retrieval mAP (medium)", v["medium"]["map"])
        if protocol == "copydetection":
            return "copy detection mAP", v["map"]
        return None

    cells = []
    first = r["results"][methods[0]]
    for dataset, protocols in first.items():
        for protocol in protocols:
            figures = [headline(protocol, r["results"][m][dataset][protocol]) for m in methods]
            if figures[0] is None:
                continue
            label = figures[0][0]
            cells.append(f"{label} " + " vs ".join(f"{value:.1f}" for _, value in figures))
    return [what, "; ".join(cells), f"features extracted in {sum(r['feature_seconds'].values()):.0f} s"]


# Recognised by keys every JSON of that kind has; the first match wins.
RENDERERS = (
    (("median_ms", "peak_extra_memory_mib"), loss_row),
    (("images_per_s", "settings", "augment_only"), loaders_row),
    (("summary", "figures", "profile_split_us_per_image_1_thread"), producer_row),
    (("results", "speedup_dali_producer_over_torchvision"), dali_row),
    (("resample_us_per_photograph", "worst_psnr_producer_vs_pil_db"), resample_row),
    (("rss_growth_after_warmup_mib_per_rank",), soak_row),
    (("comparisons", "profiler"), check_row),
    (("compute", "verdict", "shape"), profile_row),
    (("knn", "train_wall_s"), demo_row),
    (("tool", "results", "feature_seconds"), suite_row),
)


def records() -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in sorted(BENCHMARKS.glob("*.json"))]


def table(entries: list[tuple[str, dict]], full: bool = True, link_prefix: str = "benchmarks/") -> str:
    """One row per record. ``full``: every figure and the command (docs/results.md); else the
    headline figures only (the README), the rest being one click away in the JSON."""
    header = ["what", "result", "machine"] + (["command"] if full else []) + ["JSON"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    unknown = []
    for name, record in entries:
        renderer = next((fn for keys, fn in RENDERERS if all(k in record for k in keys)), None)
        if renderer is None:
            unknown.append(name)
            continue
        what, result, *detail = renderer(name, record)
        if full and detail and detail[0]:
            result += "; " + detail[0]
        cells = [what, result, _machine(record)] + ([_command(record)] if full else [])
        rows.append("| " + " | ".join(cells) + f" | [{name}]({link_prefix}{name}) |")
    text = "\n".join(rows)
    if unknown:
        text += "\n\nNot rendered (unknown kind): " + ", ".join(f"`{n}`" for n in unknown)
    return text


# ---------------------------------------------------------------------------- chart
def chart_bars(entries: list[tuple[str, dict]]) -> list[tuple[str, list[tuple[str, float, str]]]]:
    """Panels of (label, value, unit) bars: loader images/s and loss milliseconds."""
    panels = []
    for name, r in entries:
        if "augment_only" in r and "images_per_s" in r:
            ips = r["images_per_s"]
            panels.append((f"CPU loaders, images/s, higher is better ({name})", [
                ("torchvision (published)", ips["torchvision"]["median"], "img/s"),
                ("FFCV producer", ips["ffcv_producer"]["median"], "img/s")]))
        elif "speedup_dali_producer_over_torchvision" in r:
            res = r["results"]
            panels.append((f"CPU loaders, images/s, higher is better ({name})", [
                ("torchvision (published)", res["torchvision"]["images_per_s_median"], "img/s"),
                ("DALI producer, CPU mode", res["dali_producer"]["images_per_s_median"], "img/s")]))
        elif "median_ms" in r and r.get("torch_threads", 0) > 1:
            ms = r["median_ms"]
            panels.append((f"CARP loss fwd+bwd on {r['device']}, ms, lower is better ({name})", [
                (impl, ms[impl], "ms") for impl in ("published", "reference", "compiled", "fused") if ms.get(impl)]))
        elif "compute" in r and "baseline" in r and r.get("device", "").startswith("cuda"):
            bars = [("published recipe", r["baseline"]["images_per_s"], "img/s"),
                    ("carp_fast, eager", r["compute"]["images_per_s"], "img/s")]
            if "images_per_s" in r.get("compute_compiled", {}):
                bars.append(("carp_fast, torch.compile", r["compute_compiled"]["images_per_s"], "img/s"))
            gpu = (r.get("machine") or {}).get("gpu", "GPU")
            panels.append((f"Training step on one {gpu}, images/s, higher is better ({name})", bars))
    return panels


def chart_svg(panels) -> str:
    width, label_w, bar_w, row_h, title_h = 720, 200, 420, 22, 28
    height = sum(title_h + row_h * len(bars) + 12 for _, bars in panels) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    y = 10
    for title, bars in panels:
        out.append(f'<text x="10" y="{y + 16}" font-weight="bold">{html.escape(title)}</text>')
        y += title_h
        top = max(value for _, value, _ in bars)
        for label, value, unit in bars:
            length = bar_w * value / top
            out.append(f'<text x="10" y="{y + 15}">{html.escape(label)}</text>')
            out.append(f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 6}" fill="#4a7bb7"/>')
            out.append(f'<text x="{label_w + length + 6:.1f}" y="{y + 15}">{value:,.1f} {unit}</text>')
            y += row_h
        y += 12
    out.append("</svg>")
    return "\n".join(out) + "\n"


def section(entries) -> str:
    """The README's Results: the chart and the headline of every record."""
    chart = "![Loader, loss and step figures](benchmarks/performance.svg)\n\n" if chart_bars(entries) else ""
    return (
        "Generated by `python tools/performance_report.py` from the JSON under `benchmarks/`\n"
        "(each holds its machine, versions, commit and command; ratios were measured within\n"
        "one run, and speeds on the shared 2-core CI machine are lower bounds). Every figure\n"
        "of each record, with its command: [docs/results.md](docs/results.md).\n\n"
        + chart + table(entries, full=False)
    )


def full_section(entries) -> str:
    """docs/results.md: every figure of every record, with the command that made it."""
    return ("Generated by `python tools/performance_report.py` from the JSON under `benchmarks/`.\n\n"
            + table(entries, full=True, link_prefix="../benchmarks/"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    entries = records()
    svg = chart_svg(chart_bars(entries))
    regenerate = "python tools/performance_report.py"
    if args.check:
        status = readme_sections.update(START, END, section(entries), True, regenerate)
        status |= readme_sections.update(START, END, full_section(entries), True, regenerate, RESULTS)
        if not CHART.exists() or CHART.read_text() != svg:
            print(f"{CHART} is out of date: run {regenerate}")
            return 1
        return status
    CHART.write_text(svg)
    readme_sections.update(START, END, full_section(entries), False, "", RESULTS)
    return readme_sections.update(START, END, section(entries), False, "")


if __name__ == "__main__":
    sys.exit(main())
