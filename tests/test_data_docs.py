"""docs/data.md's configuration table, conf/data/*.yaml and the DataModule's defaults agree."""

import inspect
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from magitrain.data.datamodule import MagiDataModule

ROOT = Path(__file__).resolve().parents[1]


def config(name: str) -> dict:
    """conf/data/NAME.yaml with its defaults list applied (raw starts from latent), unresolved."""
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    base = OmegaConf.create()
    for parent in cfg.pop("defaults", []):
        if parent != "_self_":
            base = OmegaConf.merge(base, config(parent))
    return OmegaConf.to_container(OmegaConf.merge(base, cfg), resolve=False)


def docs_table() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("## DataModule configuration") :]
    section = section[: section.index("\n## ", 5)]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \|([^|]*)\|([^|]*)\|", line)
        if match:
            rows[match[1]] = (match[2].strip(), match[3].strip())
    return rows


def cell(text: str):
    return yaml.safe_load(text.strip("`")) if text.startswith("`") else None


def test_docs_table_lists_the_config_values():
    latent, raw, rows = config("latent"), config("raw"), docs_table()
    assert set(rows) == (set(latent) | set(raw)) - {"_target_"}
    for field, (in_latent, in_raw) in rows.items():
        if field == "buckets":
            continue
        if field in latent:
            assert cell(in_latent) == latent[field], field
        else:
            assert in_latent == "", field
        assert (raw[field] == latent.get(field)) if in_raw == "-" else (cell(in_raw) == raw[field]), field


@pytest.mark.parametrize("name", ["latent", "raw"])
def test_datamodule_defaults_are_the_latent_config(name):
    latent, raw = config("latent"), config("raw")
    for field, param in inspect.signature(MagiDataModule).parameters.items():
        value = latent.get(field, raw.get(field))
        if param.default is inspect.Parameter.empty or value is None and field not in latent:
            continue
        if isinstance(value, str) and (value.startswith("${") or value == "???") or field == "buckets":
            continue
        assert param.default == value, field
