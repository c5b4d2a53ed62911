"""The bubble fractions bench/pipeline_bubbles.py reads from torch's schedules (pp=4, 8 microbatches)."""

import pytest

from tests.runs import load_bench

PP, MICROBATCHES = 4, 8


bubbles = load_bench("pipeline_bubbles")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_single_stage_schedules_have_the_textbook_bubble(schedule):
    row = bubbles.measure(schedule, PP, MICROBATCHES, virtual_stages=1)
    textbook = (PP - 1) / (MICROBATCHES + PP - 1)
    assert row["bubble_fraction"] == pytest.approx(textbook)
    assert list(row["bubble_fraction_per_rank"].values()) == pytest.approx([textbook] * PP)


def test_interleaving_shrinks_the_bubble_and_zero_bubble_shrinks_it_further():
    one_f_one_b = bubbles.measure("1f1b", PP, MICROBATCHES, virtual_stages=1)["bubble_fraction"]
    interleaved = bubbles.measure("interleaved_1f1b", PP, MICROBATCHES, virtual_stages=2)["bubble_fraction"]
    zero_bubble = bubbles.measure("zero_bubble", PP, MICROBATCHES, virtual_stages=2)["bubble_fraction"]
    assert zero_bubble < interleaved < one_f_one_b
