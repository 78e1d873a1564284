"""ReqToTokenTable: writes reach the device table only through one batched flush."""

from __future__ import annotations

import torch

from radixfleet.engine.memory.req_table import ReqToTokenTable


def test_writes_are_read_back_at_once_and_reach_the_device_table_on_flush():
    t = ReqToTokenTable(4, 16, "cpu")
    row = t.alloc()
    t.write(row, 0, torch.tensor([5, 6, 7]))
    t.write(row, 3, torch.tensor([9]))
    assert t.read(row, 4).tolist() == [5, 6, 7, 9]
    assert t.slot(row, 3) == 9
    assert t.table[row, :4].tolist() == [0, 0, 0, 0]  # not flushed yet
    t.flush()
    assert t.table[row, :4].tolist() == [5, 6, 7, 9]
    assert t.table.dtype == torch.int32


def test_a_position_written_twice_before_a_flush_keeps_its_last_value():
    t = ReqToTokenTable(4, 16, "cpu")
    a, b = t.alloc(), t.alloc()
    t.write(a, 0, torch.tensor([1, 2]))
    t.free(a)
    c = t.alloc()  # the freed row, reused by another request in the same step
    assert c == a
    t.write(c, 0, torch.tensor([3]))
    t.write(b, 2, torch.tensor([4, 5]))
    t.flush()
    assert t.table[c, :2].tolist() == [3, 2]
    assert t.table[b, 2:4].tolist() == [4, 5]
    t.flush()  # nothing pending: a no-op
    assert t.table[c, :2].tolist() == [3, 2]
