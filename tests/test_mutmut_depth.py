"""mutmut's ``max_stack_depth`` as ``tests/mutmut_depth.py`` counts it: frames of mutated code between
a call and the test runner, frames without a file counted as other code instead of raising."""
from __future__ import annotations

import importlib.util
import inspect
import shutil
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import mutmut_depth as D

CHAIN = textwrap.dedent(
    """
    import inspect

    def innermost():
        return inspect.currentframe()

    def middle(via_string):
        if via_string:  # through a frame with no file, as a dataclass' generated __init__ is
            scope = {"innermost": innermost}
            exec(compile("def generated():\\n    return innermost()\\n", "<string>", "exec"), scope)
            return scope["generated"]()
        return innermost()

    def outer(via_string=False):
        return middle(via_string)
    """
)


@pytest.fixture
def chain():
    """``outer -> middle -> innermost`` in a module file under a fresh ``mutated`` folder: the frame
    of ``innermost`` has 3 frames of mutated code up to this test (its own included). Not under
    pytest's ``tmp_path``, whose path says "pytest": a runner's file, by mutmut's rule."""
    base = Path(tempfile.mkdtemp(prefix="qins-depth-"))
    root = base / "mutated"
    root.mkdir()
    path = root / "chain_module.py"
    path.write_text(CHAIN)
    spec = importlib.util.spec_from_file_location("chain_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module, [root.resolve()]
    shutil.rmtree(base, ignore_errors=True)


def test_frames_of_mutated_code_are_counted_up_to_the_test_runner(chain) -> None:
    module, roots = chain
    frame = module.outer()
    assert [D.within_depth(frame, depth, roots) for depth in (1, 2, 3, 4, 10)] == [False, False, False, True, True]
    assert D.within_depth(frame, -1, roots)


def test_a_frame_without_a_file_counts_as_other_code_and_does_not_raise(chain) -> None:
    module, roots = chain
    frame = module.outer(via_string=True)  # innermost <- <string> <- middle <- outer
    assert D.frame_kind("<string>", roots) == D.OTHER
    with pytest.raises(FileNotFoundError):  # what mutmut 3.8.1's own walk does with it
        Path("<string>").resolve(strict=True)
    assert [D.within_depth(frame, depth, roots) for depth in (3, 4)] == [False, True]


def test_frame_kinds_runner_mutated_other(chain) -> None:
    module, roots = chain
    assert D.frame_kind(module.__file__, roots) == D.MUTATED
    assert D.frame_kind(str(roots[0] / "absent.py"), roots) == D.OTHER  # no such file: other
    assert D.frame_kind(inspect.__file__, roots) == D.OTHER
    assert D.frame_kind(pytest.__file__, roots) == D.RUNNER


def test_the_runners_frame_ends_the_walk_before_the_budget_is_spent(chain) -> None:
    module, roots = chain
    frame = module.outer()
    runner_frames = 0
    f = frame
    while f is not None:
        runner_frames += D.frame_kind(f.f_code.co_filename, roots) == D.RUNNER
        f = f.f_back
    assert runner_frames > 0  # this test was called by pytest: the walk stops there
    assert D.within_depth(frame, 4, roots)


def test_install_replaces_mutmuts_recorder_only_where_the_trampoline_uses_mutmuts_own() -> None:
    def mutmuts(name, caller=None):
        return None

    stats, trampoline = SimpleNamespace(record_trampoline_hit=mutmuts), SimpleNamespace(record_trampoline_hit=mutmuts)
    assert D.install(stats, trampoline) and trampoline.record_trampoline_hit is D.record_trampoline_hit
    assert D.install(stats, trampoline)  # again: already in place
    other = SimpleNamespace(record_trampoline_hit=lambda name, caller=None: None)
    assert not D.install(stats, other) and other.record_trampoline_hit is not D.record_trampoline_hit
    assert not D.install(stats, SimpleNamespace())


def test_a_childs_environment_drops_the_stats_pass_and_keeps_a_mutant() -> None:
    assert D.child_environ({"MUTANT_UNDER_TEST": "stats", "A": "1"}) == {"A": "1"}
    mutant = {"MUTANT_UNDER_TEST": "qins.codec.x_decode__mutmut_3", "A": "1"}
    assert D.child_environ(mutant) == mutant and D.child_environ(mutant) is not mutant
    assert D.child_environ({}) == {}
