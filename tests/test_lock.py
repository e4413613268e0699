"""requirements.lock: resolved from today's pyproject.toml, complete, hashed, and with the CPU torch."""

import importlib.util
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "lock.py"


def load_lock_script():
    spec = importlib.util.spec_from_file_location("lock_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(lock: Path) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), flags=re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def test_lock_was_regenerated_after_the_last_dependency_change():
    lock = load_lock_script()
    assert lock.recorded_hash() == lock.dependency_hash(), (
        "pyproject.toml's dependencies changed since requirements.lock was made: run `make lock`"
    )


def test_a_dependency_change_changes_the_recorded_hash(tmp_path):
    lock = load_lock_script()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(lock.PYPROJECT.read_text().replace('"pyyaml>=6"', '"pyyaml>=6.0.2"'))
    assert changed.read_text() != lock.PYPROJECT.read_text()
    assert lock.dependency_hash(changed) != lock.dependency_hash()


def test_the_lock_pins_every_requirement_with_hashes_and_the_cpu_torch():
    lock = load_lock_script()
    pinned = pins(lock.LOCK)
    tables = lock.dependency_tables()
    wanted = [*tables["build-system.requires"], *tables["project.dependencies"]]
    for extra in lock.EXTRAS:
        wanted += tables["project.optional-dependencies"][extra]
    for text in wanted:
        requirement = Requirement(text)
        if requirement.name == "omnitransfer":  # the test extra names the train extra
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pinned, f"{text} is not in the lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (text, pinned[name])
    assert pinned["torch"].endswith("+cpu")
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.LOCK.read_text().split("\n", 3)[3])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)
