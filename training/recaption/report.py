"""The end-of-run summary: a JSON report (counts, word/token statistics, flags, failures) and a histogram PNG."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from lens_core.atomic_io import atomic_write_bytes, atomic_write_text

from ..secret_scrubber import scrub


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def percentile(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p10": percentile(0.1),
        "p90": percentile(0.9),
    }


def build_report(
    records: list[dict[str, Any]], *, target_words: int, token_limit: int, token_counts_exact: bool
) -> dict[str, Any]:
    """Summarise the latest record of every image of this run's shard."""
    ok = [record for record in records if record.get("status") == "ok"]
    failed = [record for record in records if record.get("status") == "failed"]
    flags = Counter(flag for record in ok for flag in record.get("flags", []))
    flagged = {flag: sorted(r["key"] for r in ok if flag in r.get("flags", [])) for flag in flags}
    words = [record["words"] for record in ok]
    tokens = [record["tokens"] for record in ok]
    return {
        "total": len(records),
        "captioned": len(ok),
        "failed": len(failed),
        "failures": [{"key": r["key"], "reason": r.get("reason", "")} for r in failed],
        "target_words": target_words,
        "lens_average_words": 109,
        "token_limit": token_limit,
        "token_counts": "gpt-oss tokenizer" if token_counts_exact else "estimate",
        "words": _spread(words),
        "tokens": _spread(tokens),
        "over_token_limit": sum(count > token_limit for count in tokens),
        "flag_counts": dict(flags),
        "flagged": flagged,
    }


def draw_histogram(
    words: list[int], *, target_words: int, bin_width: int = 10, size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """Bar chart of caption lengths in words with the target (and Lens's 109-word average) marked."""
    width, height = size
    left, right, top, bottom = 48, 16, 28, 40
    upper = max([*words, target_words * 2, 120])
    bins = Counter(min(word_count, upper) // bin_width for word_count in words)
    bin_count = upper // bin_width + 1
    tallest = max(bins.values(), default=1)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    plot_width, plot_height = width - left - right, height - top - bottom
    bar = plot_width / bin_count
    for index, count in bins.items():
        x = left + index * bar
        draw.rectangle(
            [x + 1, top + plot_height * (1 - count / tallest), x + bar - 1, top + plot_height], fill=(70, 110, 200)
        )
    draw.line([left, top + plot_height, width - right, top + plot_height], fill="black")
    draw.line([left, top, left, top + plot_height], fill="black")
    for value, colour, label in (
        (target_words, (220, 60, 60), f"target {target_words}"),
        (109, (40, 160, 80), "Lens avg 109"),
    ):
        x = left + value / bin_width * bar
        draw.line([x, top, x, top + plot_height], fill=colour, width=2)
        draw.text((x + 3, top + (0 if colour[0] > 200 else 12)), label, fill=colour, font=font)
    for tick in range(0, upper + 1, max(bin_width, (upper // 8) // bin_width * bin_width)):
        x = left + tick / bin_width * bar
        draw.text((x - 6, top + plot_height + 4), str(tick), fill="black", font=font)
    draw.text((left, height - 16), f"caption length in words ({len(words)} captions)", fill="black", font=font)
    draw.text((4, top - 20), f"max {tallest}", fill="black", font=font)
    return image


def write_report(report: dict[str, Any], words: list[int], json_path: Path, png_path: Path) -> None:
    """Write the report JSON (through the secret scrubber: failure reasons quote server answers) and its histogram,
    atomically."""
    import io

    buffer = io.BytesIO()
    draw_histogram(words, target_words=report["target_words"]).save(buffer, format="PNG")
    atomic_write_bytes(png_path, buffer.getvalue())
    report = {**report, "histogram": png_path.name}
    atomic_write_text(json_path, scrub(json.dumps(report, indent=2, ensure_ascii=False)))
