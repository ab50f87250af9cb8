"""`make demo`'s choice of threads: measured, one or all, and the thread count left as found."""

import time

import torch

from tformer import demo


def test_fastest_threads_is_one_or_all_and_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    chosen = demo.fastest_threads(size=64, seconds=0.05)
    assert chosen in {1, before}
    assert torch.get_num_threads() == before


def test_fastest_threads_is_one_on_a_single_core(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert demo.fastest_threads() == 1


def test_fastest_threads_picks_the_faster_setting(monkeypatch):
    """Matrix products made slow with 2 threads (as when another job holds a core) lose."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    current = {"threads": 2}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: current.update(threads=n))
    slow = {1: 0.0, 2: 0.002}
    real_matmul = torch.Tensor.__matmul__

    def matmul(self, other):
        time.sleep(slow[current["threads"]])
        return real_matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    assert demo.fastest_threads(size=8, seconds=0.05) == 1
    slow.update({1: 0.002, 2: 0.0})
    assert demo.fastest_threads(size=8, seconds=0.05) == 2
