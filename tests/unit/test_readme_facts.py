"""Facts the README states that the code decides: checked here so the two cannot drift apart.

The walkthrough itself runs in tests/integration/test_readme_walkthrough.py; these are the cheap
checks that need no processes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from worker.pipeline.poll import MAX_SEND_ATTEMPTS
from worker.settings import SettingsError, load_settings
from worker.setup.authorizations import MASK, key_hint
from worker.setup.crypto import GENERATE_HINT

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
WORDS = {1: "once", 2: "twice", 3: "three", 4: "four", 5: "five"}


def operator_block() -> str:
    return README.split("Then, as an operator:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_walkthrough_saves_the_authorization_the_example_job_names() -> None:
    adds = [
        shlex.split(line, comments=True) for line in operator_block().splitlines() if " auth add " in line
    ]
    assert len(adds) == 1
    label = adds[0][adds[0].index("--label") + 1]
    example = yaml.safe_load((ROOT / "examples" / "vip-job.yaml").read_text())
    assert example["authorization"] == label
    assert f"attentive-export auth delete {label}" in operator_block()


def test_the_number_of_sends_before_a_dead_letter_is_the_one_the_poll_uses() -> None:
    times = WORDS[MAX_SEND_ATTEMPTS]
    assert f"sent at most {times} times in all, then dead-lettered" in README
    assert f"given up after {times} failed sends" in README
    assert not re.search(r"re-?sent up to \w+ times", README)


def test_the_key_hint_shows_the_last_four_characters_as_the_readme_says() -> None:
    assert "listings show `••••` and its last four characters" in README
    assert key_hint("attn_live_0123456789abcdef") == MASK + "cdef"
    assert key_hint("demo-key") == MASK + "ey"  # "a quarter of it for a key shorter than 16"


def test_secret_key_hints_name_the_command_that_makes_one() -> None:
    assert "python -m worker.crypto" not in README
    assert "EXPORT_SECRET_KEY=$(attentive-export secret-key)" in README
    assert GENERATE_HINT.endswith("attentive-export secret-key")
    try:
        load_settings({"EXPORT_SECRET_KEY": "not a key"})
    except SettingsError as exc:
        assert "make one with: attentive-export secret-key" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a malformed EXPORT_SECRET_KEY was accepted")
