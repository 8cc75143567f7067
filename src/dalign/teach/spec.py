"""The safety spec: numbered policy sections per harm category, loaded from YAML and validated.

A spec file holds `default_category`, a list of `sections` (number, category, title, objective, rules [{id, text}])
and an optional `star41k_categories` mapping from STAR-41K labels to spec categories. Traces cite rules by id
("policy section 5.1 says ..."), so validation insists that rule ids start with their section number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SPEC = Path(__file__).with_name("spec.yaml")
DEFAULT_TEMPLATE = Path(__file__).with_name("teacher_prompt.j2")


class SpecError(ValueError):
    """A problem with a spec file or with the categories a prompt asks for."""


@dataclass(frozen=True)
class Rule:
    id: str
    text: str


@dataclass(frozen=True)
class Section:
    number: int
    category: str
    title: str
    objective: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Spec:
    name: str
    default_category: str
    sections: tuple[Section, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # external label (e.g. STAR-41K) -> category
    source: str = "<memory>"

    @property
    def categories(self) -> list[str]:
        return [s.category for s in self.sections]

    def section(self, category: str) -> Section:
        for s in self.sections:
            if s.category == category:
                return s
        raise SpecError(
            f"category {category!r} is not in the spec {self.source}; its categories are {', '.join(self.categories)}. "
            f"Add a section for it or map the label in `star41k_categories`."
        )

    def map_label(self, label: str) -> str:
        """A category name or an external label (exact, then case-insensitive) -> a spec category."""
        label = label.strip()
        if label in self.categories:
            return label
        if label in self.aliases:
            return self.aliases[label]
        folded = {k.casefold(): v for k, v in self.aliases.items()}
        folded.update({c.casefold(): c for c in self.categories})
        if label.casefold() in folded:
            return folded[label.casefold()]
        raise SpecError(
            f"category {label!r} is not in the spec {self.source} (categories: {', '.join(self.categories)}). "
            f"Add a section for it, or map it to one under `star41k_categories` in the spec file."
        )


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return isinstance(value, (list, tuple)) and not value


def _split_labels(value: Any) -> list[str]:
    """A category cell may hold one label, a list of labels (STAR-41K) or a comma-separated string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a list stored as text in a CSV
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, list):
                return [str(v) for v in parsed if not _missing(v)]
        return [p for p in (part.strip() for part in text.split(",")) if p]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    return [str(v) for v in value if not _missing(v)]


def resolve_categories(spec: Spec, value: Any) -> tuple[list[str], bool]:
    """Map a prompt's category cell to spec categories; returns (categories, used_default).

    A missing category falls back to the spec's default category (the caller warns); an unknown one raises.
    """
    if _missing(value):
        return [spec.default_category], True
    out: list[str] = []
    for label in _split_labels(value):
        cat = spec.map_label(label)
        if cat not in out:
            out.append(cat)
    return (out, False) if out else ([spec.default_category], True)


def _need(obj: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj or obj[key] is None:
        raise SpecError(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise SpecError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {obj[key]!r}")
    return obj[key]


def parse_spec(data: Any, source: str = "<memory>") -> Spec:
    """Validate a spec mapping (as read from YAML); errors name the file, the section and the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping with `sections`, got {type(data).__name__}")
    raw_sections = _need(data, "sections", source, list)
    sections: list[Section] = []
    for i, s in enumerate(raw_sections):
        where = f"{source}: sections[{i}]"
        if not isinstance(s, dict):
            raise SpecError(f"{where} must be a mapping")
        number = _need(s, "number", where, int)
        category = _need(s, "category", where, str)
        where = f"{source}: section {number} ({category})"
        rules = []
        for j, r in enumerate(_need(s, "rules", where, list)):
            rid = str(_need(r, "id", f"{where} rules[{j}]", (str, int, float)))
            if not rid.startswith(f"{number}."):
                raise SpecError(f"{where} rules[{j}]: rule id {rid!r} must start with '{number}.'")
            rules.append(Rule(rid, _need(r, "text", f"{where} rules[{j}]", str).strip()))
        if not rules:
            raise SpecError(f"{where}: a section needs at least one rule")
        sections.append(
            Section(
                number=number,
                category=category,
                title=_need(s, "title", where, str).strip(),
                objective=_need(s, "objective", where, str).strip(),
                rules=tuple(rules),
            )
        )
    for attr in ("number", "category"):
        values = [getattr(s, attr) for s in sections]
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise SpecError(f"{source}: duplicate section {attr}(s) {sorted(dup)}")
    cats = [s.category for s in sections]
    default = data.get("default_category") or ("benign" if "benign" in cats else None)
    if default not in cats:
        raise SpecError(f"{source}: default_category {default!r} is not one of the section categories {cats}")
    aliases = data.get("star41k_categories") or {}
    if not isinstance(aliases, dict):
        raise SpecError(f"{source}: star41k_categories must map labels to categories")
    for label, cat in aliases.items():
        if cat not in cats:
            raise SpecError(f"{source}: star41k_categories maps {label!r} to {cat!r}, which has no section")
    return Spec(
        name=str(data.get("name", Path(source).stem)),
        default_category=default,
        sections=tuple(sections),
        aliases={str(k): str(v) for k, v in aliases.items()},
        source=source,
    )


def load_spec(path: str | Path | None = None) -> Spec:
    """Load a spec YAML file (default: the packaged spec)."""
    p = Path(path) if path else DEFAULT_SPEC
    return _load_cached(str(p.resolve()), p.stat().st_mtime_ns if p.exists() else 0)


@cache
def _load_cached(path: str, _mtime: int) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist (teach.spec); omit it to use the packaged spec")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {p} is not valid YAML: {e}") from e
    return parse_spec(data, str(p))


def render_teacher_prompt(
    spec: Spec, prompt: str, categories: list[str], template: str | Path | None = None
) -> str:
    """The teacher's user message: the request, then the policy text of the prompt's categories only."""
    import jinja2

    path = Path(template) if template else DEFAULT_TEMPLATE
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    tmpl = env.from_string(path.read_text(encoding="utf-8"))
    sections = [spec.section(c) for c in categories]
    titles = [s.title for s in sections]
    category_titles = titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " and " + titles[-1]
    return tmpl.render(prompt=prompt, sections=sections, category_titles=category_titles)
