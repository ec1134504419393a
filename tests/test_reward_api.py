"""The custom reward API: loading by path or module, and every failure naming the culprit."""
import pytest

from reward.api import RewardError, call_reward, load_reward_fn

USER_FILE = '''
import math
def good(prompts, completions, **info):
    return [float(len(c)) for c in completions]
def short(prompts, completions, **info):
    return [1.0]
def nan(prompts, completions, **info):
    return [1.0, math.nan]
def text(prompts, completions, **info):
    return [1.0, "high"]
def boom(prompts, completions, **info):
    raise KeyError("label")
def numpy_ok(prompts, completions, **info):
    import numpy as np
    return np.array([0.5, 1.5])
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FILE)
    return path


def test_load_by_path_and_module(user_file):
    fn = load_reward_fn(f"{user_file}:good")
    assert call_reward(fn, ["p", "q"], ["ab", "c"]) == [2.0, 1.0]
    assert load_reward_fn("reward.examples:length_target")(["p"], ["one two"], target_words=2) == [1.0]
    assert call_reward(load_reward_fn(f"{user_file}:numpy_ok"), ["p", "q"], ["a", "b"]) == [0.5, 1.5]


@pytest.mark.parametrize("name, message", [
    ("short", r"short .*returned 1 values for 2 completions"),
    ("nan", r"nan .*sample 1 is nan"),
    ("text", r"text .*sample 1 is str 'high', not a number"),
    ("boom", r"boom .*raised KeyError"),
])
def test_bad_outputs_name_function_and_sample(user_file, name, message):
    fn = load_reward_fn(f"{user_file}:{name}")
    with pytest.raises(RewardError, match=message) as e:
        call_reward(fn, ["p", "q"], ["first answer", "second answer"])
    assert "my_reward.py" in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'path/to/file.py:function'"),
    ("missing.py:fn", "does not exist"),
    ("reward.examples:nope", "has no function 'nope'"),
    ("no_such_module_xyz:fn", "cannot import module"),
])
def test_bad_specs(spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward_fn(spec)


def test_timeout_and_cancel_bound_the_wait(tmp_path):
    import threading
    import time

    from reward.api import RewardCancelled

    (tmp_path / "slow.py").write_text("import time\ndef fn(p, c, **k):\n    time.sleep(20)\n    return [0.0] * len(c)\n")
    fn = load_reward_fn(f"{tmp_path / 'slow.py'}:fn")
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"did not return within reward.timeout_seconds=0.3 s"):
        call_reward(fn, ["p"], ["a"], timeout=0.3)
    assert time.monotonic() - t < 5
    flag = threading.Event()
    threading.Timer(0.2, flag.set).start()
    t = time.monotonic()
    with pytest.raises(RewardCancelled):
        call_reward(fn, ["p"], ["a"], timeout=60, cancelled=flag.is_set)
    assert time.monotonic() - t < 5
    # a quick function is unaffected by the bound, and its errors are still named
    assert call_reward(lambda p, c, **k: [1.0] * len(c), ["p"], ["a"], timeout=5) == [1.0]
    with pytest.raises(RewardError, match="raised ZeroDivisionError"):
        call_reward(lambda p, c, **k: [1 / 0], ["p"], ["a"], timeout=5)
