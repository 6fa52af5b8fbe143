"""`trl-unlearn tune`: search spaces, the selection rule, the Optuna study (determinism, resume), bad input."""

import json
import math
import os

import pytest
import yaml

from trl_unlearn.cli import main
from trl_unlearn.tuning import spaces
from trl_unlearn.tuning.selection import NoTrialAboveFloor, SelectionRule, pareto_front, rank, select

# ----------------------------------------------------------------------------------------------------- spaces --


def test_simnpo_beta_range_keeps_the_weight_at_the_measured_nll():
    # (ln((2 - 0.1) / 0.1) - γ_high) / NLL̄ = (ln 19 - 1) / 2
    high = spaces.simnpo_beta_high(2.0, gamma_high=1.0, min_weight=0.1)
    assert high == pytest.approx((math.log(19) - 1) / 2)
    assert spaces.simnpo_weight(high, 2.0, 1.0) == pytest.approx(0.1)
    space = spaces.resolve_space("simnpo", forget_nll=2.0)
    assert space["beta"].high == pytest.approx(high) and space["beta"].low == pytest.approx(high / 30)
    assert spaces.check_simnpo_weight(space, 2.0) == pytest.approx(0.1)


def test_simnpo_beta_low_end_keeps_the_weight_at_the_retain_models_nll():
    # original 0.5 nats/token, the retain model (target) 2.0: beta from (ln 19 - 1) / 2.0 to (ln 19 - 1) / 0.5
    space = spaces.resolve_space("simnpo", forget_nll=0.5, target_nll=2.0)
    room = math.log(19) - 1
    assert (space["beta"].low, space["beta"].high) == pytest.approx((room / 2.0, room / 0.5))
    assert spaces.simnpo_weight(space["beta"].low, 2.0, 1.0) == pytest.approx(0.1)
    fixed = spaces.resolve_space("simnpo", {"beta": 1.0}, forget_nll=0.5, target_nll=2.0)
    assert fixed["beta"] == spaces.Param("categorical", choices=(1.0,))


def test_simnpo_range_that_switches_itself_off_is_refused():
    # β 2.5 at Retrain's 7.2 nats/token: 2σ(-18) = 3.0e-8
    assert spaces.simnpo_weight(2.5, 7.2) == pytest.approx(2 / (1 + math.exp(18)))
    with pytest.raises(ValueError, match=r"switches itself off.*Lower beta's high to <= 0.409"):
        spaces.resolve_space("simnpo", {"beta": {"low": 1.0, "high": 2.5}, "gamma": 0.0}, forget_nll=7.2)


def test_space_overrides_from_yaml():
    text = """
    beta: {low: 0.5, high: 2, log: true}
    gamma: 0.0
    num_train_epochs: [1, 3]
    forget_weight: null
    """
    space = spaces.resolve_space("simnpo", yaml.safe_load(text), forget_nll=0.5)
    assert space["beta"] == spaces.Param("float", 0.5, 2.0, True)
    assert space["gamma"] == spaces.Param("categorical", choices=(0.0,))
    assert space["num_train_epochs"] == spaces.Param("categorical", choices=(1, 3))
    assert "forget_weight" not in space and space["lr_mult"].log
    assert spaces.to_config_values({"lr_mult": 0.5, "beta": 1.0}, 1e-3) == {"beta": 1.0, "learning_rate": 5e-4}
    assert spaces.space_from_dict(spaces.space_to_dict(space)) == space  # what the study stores reads back


@pytest.mark.parametrize(
    "override, match",
    [
        (
            {"lr_mult": None, "num_train_epochs": None, "forget_weight": None, "beta": None},
            "search space of npo is empty",
        ),
        ({"beta": {"low": 1.0, "high": 0.5}}, r"search space `beta`: range \[1.0, 0.5\] is empty; give low <= high"),
        ({"beta": {"low": 0, "high": 1, "log": True}}, "must be > 0; set log: false"),
        ({"beta": {"lo": 0.1, "high": 1}}, r"unknown key\(s\) \['lo'\]"),
        ({"learning_rate": {"low": 1e-5, "high": 1e-4}}, "both `lr_mult` and `learning_rate`"),
    ],
)
def test_bad_spaces_name_the_fix(override, match):
    with pytest.raises(ValueError, match=match):
        spaces.resolve_space("npo", override)


# -------------------------------------------------------------------------------------------------- selection --

TABLE = [  # number, forget quality, utility; original utility 0.8 -> floor 0.76 at 0.95
    {"number": 0, "forget_quality": 0.9, "model_utility_no_rouge": 0.70},  # best score, below the floor
    {"number": 1, "forget_quality": 0.4, "model_utility_no_rouge": 0.77},
    {"number": 2, "forget_quality": 0.4, "model_utility_no_rouge": 0.79},  # ties 1 and 3 on score, higher utility
    {"number": 3, "forget_quality": 0.4, "model_utility_no_rouge": 0.79},  # ties 2 on both: the earlier trial (2) wins
    {"number": 4, "forget_quality": 0.1, "model_utility_no_rouge": 0.81},
    {"number": 5, "forget_quality": 0.05, "model_utility_no_rouge": 0.76},  # exactly at the floor: kept
]


def test_rule_picks_highest_score_above_floor_with_ties_to_utility_then_earlier():
    rule = SelectionRule(utility_floor=0.95)
    assert [t["number"] for t in rank(TABLE, rule, 0.8)] == [2, 3, 1, 4, 5]
    assert select(TABLE, rule, 0.8)["number"] == 2
    assert select(TABLE, SelectionRule(utility_floor=0.5), 0.8)["number"] == 0


def test_pareto_front_by_hand():
    # 0 (best score), 2 and 3 (equal, not beaten), 4 (best utility); 1 and 5 are beaten by 2
    assert [t["number"] for t in pareto_front(TABLE, SelectionRule())] == [0, 2, 3, 4]


def test_no_trial_above_floor_is_a_clear_message():
    with pytest.raises(
        NoTrialAboveFloor,
        match=r"no trial reaches model_utility_no_rouge >= 1 x 0.9 = 0.9 \(best of 6: 0.81\)"
        r": lower --utility_floor",
    ):
        select(TABLE, SelectionRule(utility_floor=1.0), 0.9)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        SelectionRule(utility_floor=1.5)


# ------------------------------------------------------------------------------------------------------ study --


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A tiny model folder, TOFU-layout data and the report of a 'retain' model (another init) on forget10."""
    from trl_unlearn.data.files import write_tofu_layout
    from trl_unlearn.data.formats import PROMPT_TEMPLATE
    from trl_unlearn.evaluation import evaluate_tofu
    from trl_unlearn.toy.synthetic import iter_texts, make_tofu_like
    from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("tune")
    data = make_tofu_like(num_authors=4, questions_per_author=4, seed=0)
    data_dir = str(write_tofu_layout(root / "tofu", data))
    tokenizer = train_tokenizer(iter_texts(data), vocab_size=300)
    for name, seed in (("model", 0), ("retain", 1)):
        model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    retain = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=1)
    report = evaluate_tofu(
        retain,
        tokenizer,
        data_dir,
        "forget10",
        prompt_format=PROMPT_TEMPLATE,
        max_length=128,
        max_new_tokens=4,
        progress=False,
    )
    report.reference["retain_forget_truth_ratio"] = list(report.per_item["forget"]["truth_ratio"])
    report.save(root / "retain_report.json")
    recipe = {
        "per_device_train_batch_size": 4,
        "max_length": 128,
        "activation_checkpointing": False,
        "search_space": {"num_train_epochs": 1, "lr_mult": {"low": 0.3, "high": 3.0, "log": True}},
    }
    with open(root / "recipe.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    return {
        "root": root,
        "model": str(root / "model"),
        "data": data_dir,
        "report": str(root / "retain_report.json"),
        "recipe": str(root / "recipe.yaml"),
    }


def tune_argv(material, out, *extra, method="simnpo", n_trials=3):
    return [
        "tune",
        method,
        "--model_name_or_path",
        material["model"],
        "--data_dir",
        material["data"],
        "--forget_split",
        "forget10",
        "--retain_report",
        material["report"],
        "--config",
        material["recipe"],
        "--base_learning_rate",
        "1e-3",
        "--n_trials",
        str(n_trials),
        "--output_dir",
        str(out),
        *extra,
    ]


def test_tiny_tune_end_to_end_is_deterministic_and_best_yaml_runs(material, tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        assert main(tune_argv(material, out, "--report_seeds", "1", "--storage", f"sqlite:///{tmp_path}/s{k}.db")) == 0
        assert {"tuning.json", "pareto.png", "best.yaml"} <= set(os.listdir(out))
        runs.append(json.load(open(out / "tuning.json")))
    a, b = runs
    assert len(a["trials"]) == 3 and a["tuning_seeds"] == [0] and a["report_seeds"] == [1]
    key = lambda r: [(t["params"], t["forget_quality"], t["model_utility_no_rouge"]) for t in r["trials"]]  # noqa: E731
    assert key(a) == key(b) and a["selected"] == b["selected"]
    # the rule as declared, recomputed from the table
    floor = a["rule"]["utility_threshold"]
    kept = [t for t in a["trials"] if t["model_utility_no_rouge"] >= floor]
    best = max(kept, key=lambda t: (t["forget_quality"], t["model_utility_no_rouge"], -t["number"]))
    assert a["selected"]["trial"] == best["number"]
    assert a["selected"]["config"]["learning_rate"] == pytest.approx(best["params"]["lr_mult"] * 1e-3)
    assert set(a["report"]["gap_in_minus_out"]) == {"forget_quality", "model_utility_no_rouge"}
    assert a["report"]["full"]["per_seed"][0]["seed"] == 1 and "forget_rougeL_recall" in a["report"]["full"]
    recipe = yaml.safe_load(open(tmp_path / "run0" / "best.yaml"))
    assert recipe["beta"] == best["params"]["beta"] and recipe["dataset_name"] == material["data"]
    assert (
        main(
            [
                "simnpo",
                "--config",
                str(tmp_path / "run0" / "best.yaml"),
                "--model_name_or_path",
                material["model"],
                "--output_dir",
                str(tmp_path / "X"),
                "--max_steps",
                "1",
            ]
        )
        == 0
    )
    assert os.path.isfile(tmp_path / "X" / "config.json")


def test_interrupted_study_resumes_to_the_requested_total(material, tmp_path):
    import optuna

    from trl_unlearn.tuning.study import TofuScorer, tune

    storage = f"sqlite:///{tmp_path}/study.db"
    calls = []

    def interrupting(model, tokenizer):
        calls.append(1)
        if len(calls) == 6:  # the original model, 4 trials, then an interrupt in the 5th trial
            raise KeyboardInterrupt
        return scorer(model, tokenizer)

    from trl_unlearn.evaluation.report import EvalReport
    from trl_unlearn.loading import load_tokenizer

    scorer = TofuScorer(
        material["data"],
        "forget10",
        load_tokenizer(material["model"]),
        "Question: {question}\nAnswer:",
        EvalReport.load(material["report"]),
    )
    recipe = yaml.safe_load(open(material["recipe"]))
    kw = dict(
        output_dir=str(tmp_path / "out"),
        recipe=recipe,
        storage=storage,
        report_seeds=(),
        progress=False,
        base_learning_rate=1e-3,
    )
    with pytest.raises(KeyboardInterrupt):
        tune("simnpo", material["model"], material["data"], n_trials=6, score_fn=interrupting, **kw)
    study = optuna.load_study(study_name="simnpo-forget10", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    result = tune("simnpo", material["model"], material["data"], n_trials=6, score_fn=scorer, **kw)
    assert result["study"]["finished_trials"] == 6 and len(result["trials"]) == 6
    assert [t["number"] for t in result["trials"]] == [0, 1, 2, 3, 5, 6]  # trial 4 failed when interrupted
    drawn = [t["params"] for t in result["trials"]]
    assert all(drawn[i] not in drawn[:4] for i in (4, 5))  # the resumed sampler does not repeat the first points
    again = tune("simnpo", material["model"], material["data"], n_trials=6, score_fn=scorer, **kw)
    assert len(again["trials"]) == 6  # nothing more to run


@pytest.mark.parametrize(
    "extra, method, match",
    [
        ((), "sgd", "Unknown method 'sgd': choose one of simnpo, npo"),
        (("--storage", "sqlite:////no_such_dir_tune/x.db"), "simnpo", "cannot open the Optuna storage"),
        (("--report_seeds", "0,1"), "simnpo", r"seed\(s\) \[0\] are both tuning and report seeds"),
        (("--utility_floor", "2"), "simnpo", r"must lie in \[0, 1\]"),
        (("--n_trials", "0"), "simnpo", "must be >= 1"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(material, tmp_path, capsys, extra, method, match):
    import re

    assert main(tune_argv(material, tmp_path / "o", *extra, method=method)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_missing_retain_report_and_empty_space_are_errors(material, tmp_path, capsys):
    argv = tune_argv(material, tmp_path / "o")
    i = argv.index("--retain_report")
    assert main(argv[:i] + argv[i + 2 :]) == 2
    assert "give --retain_report R.json" in capsys.readouterr().err
    space = tmp_path / "space.yaml"
    space.write_text("lr_mult: null\nnum_train_epochs: null\n")
    argv = tune_argv(material, tmp_path / "o", "--search_space", str(space), method="gradascent")
    i = argv.index("--config")
    assert main(argv[:i] + argv[i + 2 :]) == 2
    err = capsys.readouterr().err
    assert "search space of gradascent is empty" in err and len(err.strip().splitlines()) == 1


def test_every_method_has_a_default_space_of_its_own_config_fields():
    """Each registered method can be tuned: its default space names only fields of its config (or `lr_mult`), and
    every range lies inside what the config accepts (checked by building the config at both ends)."""
    import dataclasses

    from trl_unlearn.methods import REGISTRY, get_method
    from trl_unlearn.tuning.spaces import default_space

    for method in REGISTRY:
        space = default_space(method, forget_nll=2.0, num_layers=8, target_nll=6.0)
        _, config_cls = get_method(method)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        assert set(space) - {"lr_mult"} <= fields, (method, set(space) - fields)
        required = {"retain_loss_eps": 0.5} if method == "pdu" else {}
        for end in ("low", "high"):
            values = {n: (p.choices[0] if p.kind == "categorical" else getattr(p, end)) for n, p in space.items()}
            values.pop("lr_mult", None)
            values = {n: int(v) if space[n].kind == "int" else v for n, v in values.items()}
            config_cls(output_dir="unused", use_cpu=True, bf16=False, report_to=[], **required, **values)
