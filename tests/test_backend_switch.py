"""imgtx_fast.backend(...) restores what was active when it was entered, whatever happens inside:
set_backend() calls, exceptions, nesting, other threads."""
import threading

import pytest

from imgtx_fast import backend, get_backend, set_backend


@pytest.fixture(autouse=True)
def fast_default():
    set_backend("fast")
    yield
    set_backend("fast")


@pytest.mark.parametrize("default", ["fast", "reference"])
@pytest.mark.parametrize("inside", ["fast", "reference"])
@pytest.mark.parametrize("switch_to", ["fast", "reference"])
def test_set_backend_inside_a_block_is_undone_at_its_end(default, inside, switch_to):
    set_backend(default)
    with backend(inside):
        assert get_backend() == inside
        set_backend(switch_to)  # process-wide, and it drops this thread's block backend
        assert get_backend() == switch_to
    assert get_backend() == default
    set_backend("reference" if default == "fast" else "fast")  # the default still switches
    assert get_backend() != default


def test_exception_inside_restores_and_propagates():
    with pytest.raises(KeyError):
        with backend("reference"):
            set_backend("reference")
            raise KeyError("boom")
    assert get_backend() == "fast"
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend("nope"):
            pass
    assert get_backend() == "fast"
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend("reference"):
            set_backend("nope")
    assert get_backend() == "fast"


def test_nested_blocks_restore_each_level():
    seen = []
    with backend("reference"):
        with backend("reference"):
            with backend("fast"):
                set_backend("reference")
                seen.append(get_backend())
            seen.append(get_backend())
            set_backend("fast")
            seen.append(get_backend())
        seen.append(get_backend())
    seen.append(get_backend())
    assert seen == ["reference", "reference", "fast", "reference", "fast"]


def test_blocks_are_per_thread_and_leave_other_threads_switches_alone():
    entered, switched, done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def in_block():
        with backend("reference"):
            entered.set()
            switched.wait(5)
            seen["inside"] = get_backend()
        seen["after"] = get_backend()  # the other thread's set_backend stands
        done.set()

    t = threading.Thread(target=in_block)
    t.start()
    entered.wait(5)
    seen["main while other in block"] = get_backend()
    set_backend("reference")
    switched.set()
    done.wait(5)
    t.join(5)
    assert seen == {"main while other in block": "fast", "inside": "reference",
                    "after": "reference"}
    assert get_backend() == "reference"

