"""One self-contained HTML report: summary, tables and charts (embedded as base64), no external URLs."""
from __future__ import annotations

import base64
import html
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import pandas as pd

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.files import atomic_path

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .3rem; }
/* wide tables scroll inside their own box instead of overflowing the page */
.table-wrap { max-width: 100%; overflow-x: auto; margin: .8rem 0 1.6rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; vertical-align: top; }
th { background: #f3f3f3; max-width: 14rem; white-space: normal; overflow-wrap: anywhere; }
td { overflow-wrap: anywhere; }
p.note { color: #444; font-size: .9rem; max-width: 60rem; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0 2rem; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption, .generated { color: #666; font-size: .85rem; }
"""


def markdown_to_html(text: str) -> str:
    """The small markdown subset markdown_summary writes: '#' headings, pipe tables, '- ' lists,
    paragraphs, **bold** and `code`. Everything else is shown as escaped text."""
    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def cells(row: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]

    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        heading = re.match(r"(#{1,6})\s+(.*)", lines[0])
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif len(lines) >= 2 and lines[0].lstrip().startswith("|") and set(lines[1]) <= set("|-: "):
            head = "".join(f"<th>{inline(c)}</th>" for c in cells(lines[0]))
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells(r)) + "</tr>" for r in lines[2:])
            out.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                       "</table></div>")
        elif all(line.lstrip().startswith(("- ", "* ")) for line in lines):
            out.append("<ul>" + "".join(f"<li>{inline(line.lstrip()[2:])}</li>" for line in lines) + "</ul>")
        else:
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _image_tag(name: str, path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise StorageError(f"image {name!r} at {path} has an unsupported type; use one of {sorted(_MIME)}")
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise StorageError(f"cannot read image {name!r} at {path}: {exc}") from exc
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def table_html(table: pd.DataFrame) -> str:
    """``table`` as an HTML table in a horizontally scrolling box. A named index (model, level …)
    becomes ordinary leading columns; an unnamed one (0, 1, 2 …) is left out."""
    named = any(name is not None for name in table.index.names)
    frame = table.reset_index() if named else table
    return ('<div class="table-wrap">' + frame.to_html(border=0, na_rep="—", escape=True, index=False)
            + "</div>")


def write_html_report(
    path: str | os.PathLike,
    *,
    dataset: str,
    summary_markdown: str,
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, str | os.PathLike],
    html_sections: Mapping[str, str] | None = None,
    table_notes: Mapping[str, str] | None = None,
    image_sections: Mapping[str, Mapping[str, str | os.PathLike]] | None = None,
) -> Path:
    """Write one self-contained HTML file at `path` (atomically) and return the path.

    Order: title, summary (markdown rendered), each table under its name as a heading (with its
    note from ``table_notes`` below the heading), each of ``html_sections`` (trusted HTML fragments
    made by this project, e.g. the coloured AUC difference tables), the images under 'Charts'
    (embedded as base64 data URIs, captioned by their name), then each of ``image_sections``
    (heading → {caption: image}). No external URL is referenced.
    Raises StorageError when an image cannot be read or the file cannot be written.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = table_notes or {}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>nfhm report — {html.escape(dataset)}</title><style>{_CSS}</style></head><body>",
        f"<h1>nfhm report — {html.escape(dataset)}</h1>",
        f'<p class="generated">generated {stamp}</p>',
        markdown_to_html(summary_markdown),
    ]
    for name, table in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if name in notes:
            parts.append(f'<p class="note">{html.escape(notes[name])}</p>')
        parts.append(table_html(table))
    for name, fragment in (html_sections or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f'<div class="table-wrap">{fragment}</div>')
    sections = {"Charts": images, **(image_sections or {})}
    for heading, members in sections.items():
        if members:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            parts += [_image_tag(name, Path(p)) for name, p in members.items()]
    parts.append("</body></html>\n")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
