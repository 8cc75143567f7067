"""Dataset cards (origin, licence, version, how built) and the `dalign datasets` listing."""

from __future__ import annotations

from dalign.data import DATASETS, _ensure_registered
from dalign.data import offline as off


def dataset_card(name: str) -> dict:
    """Everything known about a registered dataset, including the installed offline packages' metadata."""
    _ensure_registered()
    DATASETS.get(name)  # unknown names raise, listing the known ones
    info = DATASETS.info[name]
    keys = info.get("offline") or []
    packages = {}
    for k in keys:
        f = off.FILES[k]
        meta = off.package_info(f.pip_name)
        packages[k] = {
            "package": f.pip_name,
            "file": f.relpath,
            "installed": off.available(k),
            "version": meta.get("version"),
            "package_licence": meta.get("licence"),
            "homepage": meta.get("homepage"),
        }
    return {
        "name": name,
        "kind": info.get("kind", "safety"),
        "checker": info.get("checker"),
        "size": info.get("size"),
        "hub": info.get("hub"),
        "offline": packages,
        "offline_available": bool(keys) and all(p["installed"] for p in packages.values()),
        "origin": info.get("origin", ""),
        "licence": info.get("licence", "see upstream"),
        "built": info.get("built", ""),
        "upstream_schema": info.get("schema", ""),
    }


def list_datasets() -> list[dict]:
    """One row per dataset: name, kind, size, source, offline availability and hub id (for `dalign datasets`)."""
    _ensure_registered()
    rows = []
    for name in DATASETS.names():
        card = dataset_card(name)
        pkgs = sorted(
            {f"{p['package']} {p['version'] or '(not installed)'}" for p in card["offline"].values()}
        )
        rows.append(
            {
                "name": name,
                "kind": card["kind"],
                "checker": card["checker"],
                "size": card["size"],
                "source": _source(card, pkgs, DATASETS.info[name]),
                "offline": card["offline_available"],
                "hub": card["hub"],
            }
        )
    return rows


def _source(card: dict, pkgs: list[str], info: dict) -> str:
    if card["offline_available"]:
        return "offline: " + ", ".join(pkgs)
    if card["hub"]:
        return "hub"
    return str(info.get("source") or "local file (path:)")


def format_card(card: dict) -> str:
    """A dataset card as readable text (for `dalign datasets NAME`)."""
    lines = [f"# {card['name']} ({card['kind']}, {card['size']} prompts)"]
    for key in ("origin", "licence", "built", "hub", "upstream_schema", "checker"):
        if card.get(key):
            lines.append(f"{key}: {card[key]}")
    for p in card["offline"].values():
        state = (
            f"{p['version']}, package licence {p['package_licence']}" if p["installed"] else "not installed"
        )
        lines.append(f"offline: {p['package']}:{p['file']} ({state})")
    return "\n".join(lines)
