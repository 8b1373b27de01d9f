"""The comparison table's core: which methods are on the Pareto front of accuracy against speed, and the
plot that marks them."""
from __future__ import annotations

from reasonlab.analysis.comparison import format_comparison, pareto_front, plot_comparison


def test_pareto_front_keeps_the_methods_nothing_beats_on_both_counts():
    # (examples/s, accuracy): cot slow and right, si fast and right, nocot fastest and wrong,
    # kd slower and worse than si (dominated), a tie with si is not dominated by it
    points = [(50.0, 1.0), (110.0, 0.999), (120.0, 0.47), (90.0, 0.4), (110.0, 0.999)]
    assert pareto_front(points) == [True, True, True, False, True]
    assert pareto_front([(1.0, 0.5)]) == [True]
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [False, True]  # as fast and more accurate


def test_the_plot_and_table_show_every_method(tmp_path):
    rows = [{"method": m, "n_params": 800_000, "train_steps": s, "train_time_s": 600.0, "accuracy": a,
             "accuracy_bs1": a, "accuracy_bs100": a, "examples_per_sec_bs1": v, "examples_per_sec_bs100": 20 * v,
             "tokens_per_example": t, "pareto": p}
            for m, s, a, v, t, p in [("cot", 3000, 1.0, 50.0, 16.0, True), ("nocot", 3000, 0.47, 120.0, 7.0, True),
                                     ("icot_kd", 12000, 0.4, 90.0, 7.0, False)]]
    plot_comparison(rows, [1, 100], str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_comparison(rows, [1, 100]).splitlines()
    assert len(table) == 4 and "ex/s@bs100" in table[0]
    assert table[1].split()[0] == "cot" and table[1].endswith("*") and not table[3].endswith("*")


def test_generated_tokens_count_up_to_the_stopping_eos():
    from reasonlab.evaluate import generated_tokens
    from reasonlab.tasks import make_task
    from reasonlab.tokenizer import build_tokenizer
    from reasonlab.config import config_from_dict

    tok = build_tokenizer(make_task(config_from_dict({"task": {"name": "multiplication", "a_digits": 2,
                                                               "b_digits": 2}}).task))
    eos = tok.eos_token
    cot = f" 3 4 2 + 0 8 4 6 {eos} #### 3 2 7 6 {eos}{eos}{eos}"  # padding EOS after the stop does not count
    assert generated_tokens([cot], tok, 2) == [8 + 1 + 5 + 1]
    assert generated_tokens([f"{eos} #### 3 2 7 6 {eos}"], tok, 2) == [7]  # internalized: no chain
    assert generated_tokens([f" #### 3 2 7 6 {eos}{eos}"], tok, 1) == [6]
    assert generated_tokens([" #### 3 2"], tok, 1) == [3]  # never stopped: what it wrote
