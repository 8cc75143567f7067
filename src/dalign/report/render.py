"""A tiny document model (sections of text, bullets, tables, figures) rendered to Markdown and to one
self-contained HTML file (PNGs embedded as base64, inline CSS, no network reference of any kind)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2


@dataclass
class Text:
    text: str  # `code` spans are kept; everything else is plain text


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Image:
    path: Path
    caption: str


Block = Text | Bullets | Table | Image


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]


# ---- Markdown -----------------------------------------------------------------------------------------------
def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.caption:
        lines = [f"*{t.caption}*", "", *lines]
    return "\n".join(lines)


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown with figures linked relative to `base` (the report's directory)."""
    out = [f"# {doc.title}", "", doc.subtitle, ""]
    for sec in doc.sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Text):
                out.append(b.text)
            elif isinstance(b, Bullets):
                out += [f"- {i}" for i in b.items]
            elif isinstance(b, Table):
                out.append(md_table(b))
            elif isinstance(b, Image):
                out.append(f"![{b.caption}]({b.path.relative_to(base).as_posix()})\n\n*{b.caption}*")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---- HTML ---------------------------------------------------------------------------------------------------
_SCHEME = re.compile(r"\b(?:https?|ftp)://", re.IGNORECASE)
_CODE = re.compile(r"`([^`]+)`")


def _inline(s: str) -> str:
    """Escape text for HTML, keep `code` spans, and drop URL schemes so the page references nothing remote."""
    s = html.escape(_SCHEME.sub("", str(s)))
    return _CODE.sub(r"<code>\1</code>", s)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_block(b: Block) -> str:
    if isinstance(b, Text):
        return f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        cap = f"<caption>{_inline(b.caption)}</caption>" if b.caption else ""
        head = "".join(f"<th>{_inline(c)}</th>" for c in b.columns)
        body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return (
        f'<figure><img alt="{html.escape(b.caption)}" src="{_data_uri(b.path)}">'
        f"<figcaption>{_inline(b.caption)}</figcaption></figure>"
    )


def to_html(doc: Document) -> str:
    template = resources.files("dalign.report").joinpath("report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)  # blocks are escaped above
    sections = [
        {"title": _inline(s.title), "id": f"s{i}", "body": "\n".join(_html_block(b) for b in s.blocks)}
        for i, s in enumerate(doc.sections)
    ]
    return env.from_string(template).render(
        title=_inline(doc.title), subtitle=_inline(doc.subtitle), sections=sections
    )
