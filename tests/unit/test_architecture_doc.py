"""docs/architecture.md's layout table names every module of the package (and every shipped
config) and nothing that is gone, so it cannot drift again."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def layout_rows() -> dict[str, str]:
    """`path` of each row of the layout table -> the row's text."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def problems(rows: dict[str, str], root: Path) -> list[str]:
    found = []
    package = root / "aigc_ray"
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if path.parent == package:
            if path.name != "__init__.py" and rel not in rows:
                found.append(f"{rel} has no row")
            continue
        folder = path.parent.relative_to(root).as_posix() + "/"
        if folder not in rows:
            found.append(f"{folder} has no row")
        elif path.name != "__init__.py" and f"`{path.name}`" not in rows[folder]:
            found.append(f"{rel} is not named in the {folder} row")
    for folder, text in rows.items():
        for name in re.findall(r"`(\w+\.(?:py|yaml|json))`", text):
            ours = folder.startswith(("aigc_ray/", "configs/"))
            if ours and folder.endswith("/") and not (root / folder / name).exists():
                found.append(f"{folder}{name} is named but does not exist")
        if not folder.endswith("/") and not (root / folder).exists():
            found.append(f"{folder} has a row but does not exist")
    for config in sorted((root / "configs").glob("*.yaml")):
        if f"`{config.name}`" not in rows.get("configs/", ""):
            found.append(f"configs/{config.name} is not named in the configs/ row")
    return found


def test_the_layout_names_every_module_and_nothing_gone():
    assert problems(layout_rows(), ROOT) == []


def test_the_check_finds_a_new_module_and_a_gone_one(tmp_path):
    (tmp_path / "aigc_ray" / "serve").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "aigc_ray" / "cli.py").write_text("")
    (tmp_path / "aigc_ray" / "new.py").write_text("")
    (tmp_path / "aigc_ray" / "serve" / "app.py").write_text("")
    rows = {"aigc_ray/cli.py": "x", "aigc_ray/serve/": "`app.py`, `gone.py`", "configs/": ""}
    assert problems(rows, tmp_path) == [
        "aigc_ray/new.py has no row",
        "aigc_ray/serve/gone.py is named but does not exist",
    ]
