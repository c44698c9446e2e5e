"""Config composition for every group option, and the checks run before any work starts."""

import pytest
from omegaconf import OmegaConf

from distill.config import CONF_DIR, batch_plan, cell_configs, check_config, problems, schedule, split_sweep
from distill.options import ConfigError
from tests.conftest import compose


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _leaves(node, prefix: str = "") -> dict[str, object]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


@pytest.mark.parametrize("group", ["model", "divergence", "rollout", "data", "trainer", "eval", "logger", "method",
                                   "experiment"])
def test_every_group_option_composes_into_its_own_values(group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        path = CONF_DIR / group / f"{option}.yaml"
        own = OmegaConf.to_container(OmegaConf.load(path))
        package = "" if path.read_text().startswith("# @package _global_") else f"{group}."
        cfg = OmegaConf.to_container(compose([f"{group}={option}"]))
        composed = _leaves(cfg)
        checked = 0
        for entry in own.pop("defaults", None) or []:  # `override /divergence: ab` selects that option
            if isinstance(entry, dict):
                for key, chosen in entry.items():
                    other = key.split("/")[-1]
                    if isinstance(cfg.get(other), dict) and "name" in cfg[other]:
                        assert cfg[other]["name"] == chosen, f"{group}={option}: {key}"
                        checked += 1
        for key, value in _leaves(own).items():
            if isinstance(value, str) and "${" in value:
                continue  # interpolations resolve against other groups
            assert composed[package + key] == value, f"{group}={option}: {package + key}"
            checked += 1
        assert checked, f"{group}={option} sets no value of its own"


def test_top_level_keys_and_overrides():
    cfg = compose(["divergence=jsd", "divergence.beta=0.3", "tau=2.0", "model=toy", "loss.kd_ratio=0.5"])
    assert cfg.divergence.name == "jsd" and cfg.divergence.beta == 0.3
    assert cfg.tau == 2.0 and cfg.loss.kd_ratio == 0.5
    assert {"tau_target", "tau_squared", "kd_ratio"} <= set(cfg.loss)


def test_default_config_only_lacks_a_teacher():
    # The default (toy, kd_ratio=1) needs a trained teacher; everything else is valid.
    found = problems(compose())
    assert len(found) == 1 and "model.teacher.path is not set" in found[0]
    assert problems(compose(["loss.kd_ratio=0"])) == []
    assert problems(compose(["experiment=smoke"])) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("tau=0", "tau=0: the distillation temperature must be a finite number > 0"),
        ("tau=-1", "must be a finite number > 0"),
        ("tau=inf", "must be a finite number > 0"),
        ("trainer.zero_stage=4", "trainer.zero_stage=4: must be one of [0, 1, 2, 3]"),
        ("trainer.precision=fp8", "trainer.precision='fp8'"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0"),
        ("loss.kd_ratio=1.5", "loss.kd_ratio=1.5"),
        ("loss.tau_target=student", "loss.tau_target='student'"),
        ("loss.impl=magic", "loss.impl='magic'"),
        ("divergence.name=wasserstein", "divergence='wasserstein'"),
        ("divergence=jsd divergence.beta=1.5", "divergence=jsd"),
        ("model.student.path=/no/such/dir", "model.student.path=/no/such/dir: no such directory"),
        ("eval.seeds=[]", "eval.seeds is empty"),
    ],
)
def test_each_problem_gets_its_own_clear_message(override, message):
    cfg = compose(["experiment=smoke", *override.split()])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert message in str(info.value)


def test_fp16_on_cpu_is_refused():
    assert any("fp16 does not work with DeepSpeed on CPU" in p for p in problems(compose(["experiment=smoke", "trainer.precision=fp16"])))


def test_batch_sizes_must_match_world_size():
    cfg = compose(["experiment=smoke", "trainer.micro_batch_size=4", "trainer.grad_accum=2", "trainer.global_batch_size=16"])
    assert problems(cfg, world_size=2) == []
    assert "global_batch_size=16 != micro_batch_size (4) x grad_accum (2) x world size (1) = 8" in problems(cfg, world_size=1)[0]
    odd = compose(["experiment=smoke", "trainer.global_batch_size=9"])
    assert "global_batch_size=9 is not divisible by the world size (2 ranks)" in problems(odd, world_size=2)[0]


@pytest.mark.parametrize("world, cap, expected", [
    (1, 8, (8, 4)), (2, 8, (8, 2)), (4, 8, (8, 1)), (8, 8, (4, 1)), (1, 5, (4, 8)), (3, 32, None),
])
def test_accumulation_is_derived_so_the_global_batch_holds_on_any_world_size(world, cap, expected):
    trainer = {"global_batch_size": 32, "micro_batch_size": cap, "grad_accum": None}
    if expected is None:
        with pytest.raises(ConfigError, match="not divisible by the world size"):
            batch_plan(trainer, world)
        return
    plan = batch_plan(trainer, world)
    assert (plan.micro, plan.accum) == expected and plan.micro * plan.accum * world == 32 and plan.micro <= cap


def test_epochs_become_steps_and_epoch_cadence_becomes_steps():
    trainer = {"global_batch_size": 32, "micro_batch_size": 8, "grad_accum": None, "max_steps": None, "epochs": 3,
               "eval_every": "epoch", "ckpt_every": 50}
    s = schedule(trainer, 2, n_train=1000)   # 1000 // 32 = 31 steps per epoch, the rest dropped
    assert (s.steps_per_epoch, s.max_steps, s.eval_every, s.ckpt_every) == (31, 93, 31, 50) and s.epochs == 3
    assert schedule({**trainer, "epochs": None, "max_steps": 40}, 1, 1000).max_steps == 40
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        schedule(trainer, 1, n_train=20)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.epochs=2"], "set exactly one of them"),
    (["trainer.max_steps=null"], "set exactly one of them"),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size=0: must be an integer >= 1"),
    (["trainer.grad_accum=0"], "trainer.grad_accum=0: must be null (derived)"),
    (["trainer.eval_every=weekly"], "trainer.eval_every='weekly': must be a number of steps >= 0"),
    (["trainer.select=bleu"], "trainer.select='bleu': must be one of ['last', 'loss', 'rougeL']"),
])
def test_trainer_length_and_selection_problems(overrides, message):
    assert any(message in p for p in problems(compose(["experiment=smoke", *overrides])))


def test_several_problems_are_all_reported():
    cfg = compose(["experiment=smoke", "tau=0", "trainer.zero_stage=9"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert "tau=0" in str(info.value) and "zero_stage=9" in str(info.value)


def test_hub_ids_are_not_mistaken_for_missing_paths():
    cfg = compose(["model=gpt2xl_gpt2", "data=dolly"])
    # The composed config carries the chosen options' hub ids (not the toy defaults) ...
    assert (cfg.model.teacher.path, cfg.model.student.path, cfg.model.tokenizer) == ("gpt2-xl", "gpt2", "gpt2")
    assert cfg.data.hub_id == "databricks/databricks-dolly-15k"
    # ... and hub ids are not checked as local directories, while a missing local path is.
    assert not [p for p in problems(cfg) if "no such directory" in p]
    missing = compose(["model=gpt2xl_gpt2", "data=dolly", "model.student.path=./no/such/dir"])
    assert any("model.student.path=./no/such/dir: no such directory" in p for p in problems(missing))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.impl=fused", "loss.kd_ratio=0.5"], "loss.impl=fused computes only the distillation term"),
        (["loss.impl=fused", "loss.teacher_cache=logits"], "loss.impl=fused reads the teacher's hidden states"),
        (["loss.impl=fused", "loss.teacher_cache_topk=8"], "not a log-prob cache"),
        (["loss.teacher_cache=true"], "loss.teacher_cache=true needs model.teacher.path"),
        (["loss.teacher_cache=hiden"], "loss.teacher_cache='hiden': must be one of false, true, auto"),
        (["loss.teacher_cache_topk=0"], "loss.teacher_cache_topk=0: must be null (exact) or an integer k >= 1"),
        (["model.teacher.shard=maybe"], "model.teacher.shard='maybe': must be true"),
    ],
)
def test_loss_implementation_constraints(overrides, message):
    assert any(message in p for p in problems(compose(["experiment=smoke", *overrides])))


def test_fused_loss_and_teacher_cache_are_allowed_at_every_zero_stage():
    for stage in (0, 1, 2, 3):
        for cache in ("false", "auto", "hidden"):
            cfg = compose(["experiment=smoke", "loss.impl=fused", f"trainer.zero_stage={stage}",
                           f"loss.teacher_cache={cache}", "model.teacher.shard=true", "model.teacher.path=/tmp"])
            assert problems(cfg) == [], (stage, cache)


def test_cell_configs_equal_hydras_own_composition(tmp_path):
    from omegaconf import OmegaConf

    base = ["experiment=smoke", f"paths.root={tmp_path}"]
    cells = [["divergence=rkl", "tau=2.0", "seed=1"], ["divergence=jsd", "tau=0.5", "seed=0"], ["tau=3", "seed=2"]]
    for cell, cfg in zip(cells, cell_configs(base, cells)):
        assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(compose([*base, *cell]), resolve=True)


def test_split_sweep_tells_sweeps_from_plain_overrides():
    plain, sweeps = split_sweep(["tau=1.0,2.0", "seed=0", "eval.seeds=[10,20]", "divergence=glob(*)", "+x=range(1,3)"])
    assert plain == ["seed=0", "eval.seeds=[10,20]"] and sweeps == ["tau=1.0,2.0", "divergence=glob(*)", "+x=range(1,3)"]


# ------------------------------------------------------------------ settings that cannot train
def _only_problem(*overrides: str) -> str:
    """The one problem `experiment=smoke` + `overrides` has: one line, naming what was given."""
    found = problems(compose(["experiment=smoke", *overrides]))
    assert len(found) == 1 and "\n" not in found[0], found
    return found[0]


@pytest.mark.parametrize("value", ["0", "-1", "2.5"])
def test_log_every_below_one_is_refused_before_the_first_log_line_divides_by_it(value):
    assert _only_problem(f"trainer.log_every={value}").startswith(f"trainer.log_every={value}: must be an integer >= 1")


@pytest.mark.parametrize("overrides", [["eval.temperature=0"], ["eval.temperature=-1"],
                                       ["eval.temperature=-1", "eval.do_sample=false"], ["eval.temperature=nan"]])
def test_a_sampling_temperature_that_cannot_sample_is_refused(overrides):
    msg = _only_problem(*overrides)
    assert msg.startswith("eval.temperature=") and "finite number > 0 with eval.do_sample=true" in msg
    assert "distillation temperature is tau" in msg  # the two temperatures are easy to mix up


def test_a_zero_temperature_is_fine_for_greedy_generation():
    assert problems(compose(["experiment=smoke", "eval.temperature=0", "eval.do_sample=false"])) == []


def test_a_prompt_longer_than_the_sequence_is_refused():
    msg = _only_problem("data.max_prompt_length=200", "data.max_length=192")
    assert msg.startswith("data.max_prompt_length=200 > data.max_length=192") and "<= 192" in msg
    assert problems(compose(["experiment=smoke", "data.max_prompt_length=192", "data.max_length=192"])) == []


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0", "0.0", "-1e-3", "'1e-3'"])
def test_a_learning_rate_that_cannot_train_is_refused(lr):
    msg = _only_problem(f"trainer.lr={lr}")
    assert msg.startswith("trainer.lr=") and "must be a finite number > 0" in msg


def _zero_everywhere(name: str, tau: float, tau_target: str = "both", scale: float = 1.0, **params) -> bool:
    """Is the divergence exactly 0 on other distributions than the config check's probe (another draw, logits of
    `scale` times its spread)?"""
    import torch

    from distill.losses.divergences import check_tau, per_token, resolve_params

    g = torch.Generator().manual_seed(123)
    s, t = scale * torch.randn(16, 300, generator=g), scale * torch.randn(16, 300, generator=g)
    return bool((per_token(name, s, t, *check_tau(tau, tau_target), resolve_params(name, params)) == 0).all())


@pytest.mark.parametrize(("divergence", "params", "useful"), [
    ("skl", {"alpha": 0.999999999}, "alpha well below 1"),
    ("srkl", {"alpha": 0.999999999}, "alpha well below 1"),
    ("ab", {"alpha": 100, "beta": 100}, "|alpha|, |beta| <= 10"),
    ("ab", {"alpha": 1e-20, "beta": 1}, "exactly 0, not a tiny number"),
])
def test_divergence_parameters_whose_loss_is_identically_zero_are_refused_with_their_useful_range(
        divergence, params, useful):
    assert _zero_everywhere(divergence, 1.0, **params)  # not an accident of the probe's one draw
    msg = _only_problem(f"divergence={divergence}", *(f"divergence.{k}={v}" for k, v in params.items()))
    assert msg.startswith(f"divergence={divergence} (") and "the loss is exactly 0 on two different distributions" in msg
    assert "no training signal" in msg
    assert useful in msg and "defaults:" in msg


def test_a_tau_that_flattens_both_distributions_is_refused():
    assert _zero_everywhere("fkl", 1e9, scale=10.0)  # wide, LM-like logits too: 0 at every step
    msg = _only_problem("tau=1e9")
    assert msg.startswith("tau=1e+09: the fkl loss is exactly 0") and "tau of order 1" in msg
    # Softening only the teacher leaves the student's distribution: a loss, so no refusal; SFT has no divergence.
    assert not _zero_everywhere("fkl", 1e9, "teacher", scale=10.0)
    assert problems(compose(["experiment=smoke", "tau=1e9", "loss.tau_target=teacher"])) == []
    assert problems(compose(["experiment=smoke", "tau=1e9", "loss.kd_ratio=0"])) == []


@pytest.mark.parametrize("overrides", [["divergence=ab", "divergence.alpha=-100", "divergence.beta=200"], ["tau=1e-40"]])
def test_a_divergence_that_is_not_finite_on_ordinary_distributions_is_refused(overrides):
    assert "is not finite on two different distributions" in _only_problem(*overrides)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "ab"])
def test_every_divergence_at_its_defaults_trains_at_the_usual_temperatures(divergence):
    cfg = compose(["experiment=smoke", f"divergence={divergence}"])
    for tau in (0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0):
        for target in ("both", "teacher"):
            cfg.tau, cfg.loss.tau_target = tau, target
            assert problems(cfg) == [], (divergence, tau, target)


@pytest.mark.parametrize(("override", "expected"), [
    ("eval.batch_size=0", "eval.batch_size=0: must be an integer >= 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0: must be null or an integer >= 1"),
    ("eval.max_examples=0", "eval.max_examples=0: must be null or an integer >= 1"),
    ("eval.top_p=0", "eval.top_p=0: must be in (0, 1]"),
    ("eval.top_p=1.5", "eval.top_p=1.5: must be in (0, 1]"),
    ("eval.top_k=-1", "eval.top_k=-1: must be an integer >= 0"),
    ("eval.no_repeat_ngram_size=-1", "eval.no_repeat_ngram_size=-1: must be an integer >= 0"),
    ("eval.seeds=[1.5,2]", "eval.seeds=[1.5, 2]: must be a list of integer generation seeds"),
    ("eval.seeds=[a,b]", "eval.seeds=['a', 'b']: must be a list of integer generation seeds"),
    ("eval.seeds=10", "eval.seeds=10: must be a list of integer generation seeds"),
    ("eval.do_sample=maybe", "eval.do_sample='maybe': must be true (sampling) or false (greedy)"),
])
def test_generation_settings_that_would_fail_after_training_are_refused_up_front(override, expected):
    assert _only_problem(override).startswith(expected)


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.min_lr=1", "trainer.min_lr=1: the cosine floor must be null or a number in [0, trainer.lr=0.001]"),
    ("trainer.min_lr_ratio=2", "trainer.min_lr_ratio=2: the cosine floor as a fraction of lr must be in [0, 1]"),
    ("trainer.betas=[0.9]", "trainer.betas=[0.9]: AdamW's betas must be two numbers in [0, 1)"),
    ("trainer.betas=[0.9,1.0]", "trainer.betas=[0.9, 1.0]: AdamW's betas must be two numbers in [0, 1)"),
    ("trainer.weight_decay=nan", "trainer.weight_decay=nan: must be a finite number >= 0"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1: must be a finite number >= 0"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps=-1: must be an integer >= 0"),
    ("trainer.keep_ckpts=-1", "trainer.keep_ckpts=-1: must be an integer >= 0"),
    ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s=0: the process-group timeout must be a number of seconds > 0"),
    ("trainer.num_threads=0", "trainer.num_threads=0: must be null (the default) or an integer >= 1"),
    ("trainer.select_examples=0", "trainer.select_examples=0: must be null (the default) or an integer >= 1"),
])
def test_optimizer_and_schedule_settings_that_would_fail_in_training_are_refused_up_front(override, expected):
    assert _only_problem(override).startswith(expected)


def test_check_config_raises_the_new_problems_as_one_config_error_listing_each():
    with pytest.raises(ConfigError) as err:
        check_config(compose(["experiment=smoke", "trainer.log_every=0", "trainer.lr=nan", "eval.batch_size=0"]))
    lines = str(err.value).strip().splitlines()
    assert [line.split(":")[0].lstrip("- ") for line in lines] == ["trainer.lr=nan", "trainer.log_every=0",
                                                                    "eval.batch_size=0"]


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ("soon", "'soon'"), ("true", "True")])
def test_a_bad_teacher_cache_wait_is_refused_before_any_work(value, shown):
    assert f"loss.teacher_cache_wait_s={shown}: must be a number of seconds >= 0, or null (wait for ever)" in \
        problems(compose([f"loss.teacher_cache_wait_s={value}"]))
