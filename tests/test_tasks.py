"""Tasks: the ICoT format to the byte, index-addressed generation, held-out sets kept out of training."""
from __future__ import annotations

import pytest

from conftest import ICOT
from reasonlab.config import ConfigError
from reasonlab.tasks.base import parse_line
from reasonlab.tasks.gsm8k import GSM8KParams, GSM8KTask
from reasonlab.tasks.multiplication import (MultiplicationParams, MultiplicationTask, multiplication_example,
                                            operands)

MULT_FILES = sorted(ICOT.glob("*_by_*_mult/*.txt"))


@pytest.mark.parametrize("path", MULT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_multiplication_regenerates_every_reference_line(path):
    digits = int(path.parent.name.split("_")[0])
    lines = path.read_text().splitlines()
    assert len(lines) == 1000
    for line in lines:
        a, b = operands(line.split("||")[0])
        assert multiplication_example(a, b, digits, digits).line() == line


def test_multiplication_worked_example_from_the_reference():
    # reference/icot.md §1.2: 3719 × 3349
    line = multiplication_example(3719, 3349, 4, 4).line()
    assert line == ("9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 "
                    "( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")


def test_unequal_digit_counts():
    e = multiplication_example(123, 45, 3, 2)
    assert e.prompt == "3 2 1 * 5 4"
    assert e.cot == "5 1 6 0 + 0 2 9 4 0"  # 123·5 at width 4, then 123·40 at width 5; no running sum
    assert e.answer == "5 3 5 5 0"  # 5535 padded to 5 digits


def test_example_i_does_not_depend_on_the_range_it_is_generated_in():
    task = MultiplicationTask(MultiplicationParams(a_digits=3, b_digits=3))
    whole = task.examples(0, 500)
    assert task.examples(123, 130) == whole[123:130]
    other_seed = MultiplicationTask(MultiplicationParams(a_digits=3, b_digits=3, seed=1))
    assert other_seed.examples(0, 50) != whole[:50]
    for e in whole:
        a, b = operands(e.prompt)
        assert 100 <= a <= 999 and 100 <= b <= 999


def test_training_stream_never_yields_a_heldout_prompt():
    # 2x2 has only 8,100 problems and 2,000 are held out: a quarter of all draws collide
    task = MultiplicationTask(MultiplicationParams(a_digits=2, b_digits=2))
    held = task.heldout_prompts()
    assert len(held) == 2000  # valid and test are distinct and disjoint
    stream = task.examples(0, 120_000)  # ~0.002 problems expected unseen
    assert not {e.prompt for e in stream} & held
    assert len({e.prompt for e in stream}) == 8100 - 2000  # and every other problem still occurs


def test_reference_files_as_heldout_sets():
    task = MultiplicationTask(MultiplicationParams(valid_path=str(ICOT / "4_by_4_mult/valid.txt"),
                                                   test_path=str(ICOT / "4_by_4_mult/test.txt")))
    assert task.heldout("test")[0].line() == (ICOT / "4_by_4_mult/test.txt").read_text().splitlines()[0]
    held = task.heldout_prompts()
    assert len(held) == 2000
    assert not {e.prompt for e in task.examples(0, 20_000)} & held


def test_reference_file_of_the_wrong_size_is_rejected():
    task = MultiplicationTask(MultiplicationParams(a_digits=5, b_digits=5,
                                                   valid_path=str(ICOT / "4_by_4_mult/valid.txt")))
    with pytest.raises(ConfigError, match="not a 5x5 multiplication example"):
        task.heldout("valid")


@pytest.fixture(scope="module")
def gsm8k():
    d = ICOT / "gsm8k"
    return GSM8KTask(GSM8KParams(train_path=str(d / "train_no_aug.txt"), valid_path=str(d / "valid.txt"),
                                 test_path=str(d / "test.txt")))


def test_gsm8k_reads_the_icot_files(gsm8k):
    lines = (ICOT / "gsm8k/test.txt").read_text().splitlines()
    test = gsm8k.heldout("test")
    assert len(test) == 1319 and len(gsm8k.heldout("valid")) == 500
    assert test[0].answer == "18" and test[0].cot == "<<16-3-4=9>> <<9*2=18>>"
    assert [e.line() for e in test] == [line.replace("#### " + line.rpartition("#### ")[2],
                                                     "#### " + line.rpartition("#### ")[2].replace(",", ""))
                                        for line in lines]


def test_gsm8k_stream_is_reproducible_and_excludes_heldout(gsm8k):
    n = len(gsm8k._train)
    epoch0, epoch1 = gsm8k.examples(0, n), gsm8k.examples(n, 2 * n)
    assert sorted(e.prompt for e in epoch0) == sorted(e.prompt for e in epoch1)  # each epoch is a permutation
    assert [e.prompt for e in epoch0[:20]] != [e.prompt for e in epoch1[:20]]  # in a new order
    assert gsm8k.examples(5, 9) == epoch0[5:9]
    assert not {e.prompt for e in epoch0} & gsm8k.heldout_prompts()


def test_parse_line_rejects_other_formats():
    with pytest.raises(ValueError):
        parse_line("no separator here #### 3")
    assert parse_line("q||c #### 1,234").answer == "1234"
