"""PRA-GRPO launchers: the config, OpenRLHF's real parser on our commands, dry runs, the deepspeed rank gate, service scripts and checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml
from paths import LAUNCH, ROOT, STUBS
from servers import ScriptedServer, free_port

from p2r_recipe.prompts import reason_text
from p2r_recipe.train import AGENT_FILE, REWARD_FILE
from p2r_recipe.train.command import build_command, openrlhf_args
from p2r_recipe.train.config import BASE_MODEL, TrainConfig, load_config
from p2r_recipe.train.data import perceiver_row
from p2r_recipe.train.schema import TrainSample, prompt_row
from p2r_recipe.train.services import DEFAULT_PORTS

CONFIGS = LAUNCH / "configs"
VENV_BIN = str(Path(sys.executable).parent)
SERVICE_VARS = [f"{s.upper()}_{v}" for s in DEFAULT_PORTS for v in ("HOST", "PORT", "MODEL", "API_KEY", "MODEL_PATH")]
# The release's hyper-parameters (reference section 6), kept by every size.
RELEASE = {
    "n_samples_per_prompt": 8, "rollout_batch_size": 64, "train_batch_size": 64, "learning_rate": 1e-6,
    "kl_loss_coef": 0.01, "kl_estimator": "k3", "entropy_coef": 0.0, "epochs": 1, "save_steps": 30,
    "lr_scheduler": "constant", "lr_warmup_ratio": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "weight_decay": 0.01, "max_norm": 1.0, "update_epochs": 1,
    "eval_steps": 10, "eval_temperature": 0.0, "eval_n_samples_per_prompt": 1,
}  # fmt: skip
# Micro-batches per GPU and vLLM's memory fraction: the release's 8 and 0.8 (4B); 8B keeps smaller ones of ours.
MICRO = {"2b": (8, 8, 0.8), "4b": (8, 8, 0.8), "8b": (1, 2, 0.5)}
LENGTHS = {"perceiver": (2560, 1024, 4096), "reasoner": (8704, 2048, 12288)}


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any service, P2R_ or Ray settings a developer's shell may carry."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS and not k.startswith(("P2R_", "RAY_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return {**env, **extra}


def run(argv: list, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def launcher(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, LAUNCH / name, *args], env)


def sample(tmp_path: Path) -> TrainSample:
    return TrainSample(
        id="1", question="What color is the car?", answer="A", answer_form="mca", image=str(tmp_path / "a.png")
    )


def write_dataset(path: Path, row: dict) -> Path:
    path.write_text(json.dumps(row) + "\n")
    return path


# --- config ---------------------------------------------------------------------------------------


def test_defaults_are_the_release_example_and_match_its_yaml():
    config = TrainConfig().validate()
    assert config.pretrain == BASE_MODEL == "Qwen/Qwen3-VL-4B-Instruct" and config.num_gpus == 4
    assert {k: getattr(config, k) for k in RELEASE} == RELEASE
    assert (config.prompt_max_len, config.response_max_len, config.rollout_max_len) == LENGTHS["perceiver"]
    assert load_config(CONFIGS / "perceiver_4b.yaml") == config


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_every_size_keeps_the_release_hyper_parameters(size):
    for role in ("perceiver", "reasoner"):
        path = CONFIGS / f"{role}_{size}.yaml"
        assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(TrainConfig)}, path
        config = load_config(path)
        assert config.role == role and {k: getattr(config, k) for k in RELEASE} == RELEASE
        assert (config.prompt_max_len, config.response_max_len, config.rollout_max_len) == LENGTHS[role]
        assert config.max_images_per_prompt == (1 if role == "perceiver" else 4)
        assert (config.micro_train_batch_size, config.micro_rollout_batch_size, config.vllm_gpu_memory_utilization) == MICRO[size]
        held_out = "data/p2r10k/perceiver_val.jsonl" if role == "perceiver" else f"data/stage2_{size}/reasoner_val.jsonl"
        assert config.eval_dataset == held_out
    stage1, stage2 = load_config(CONFIGS / f"perceiver_{size}.yaml"), load_config(CONFIGS / f"reasoner_{size}.yaml")
    assert stage1.pretrain == f"Qwen/Qwen3-VL-{size.upper()}-Instruct"
    assert stage2.pretrain == stage1.output_dir  # stage 2 starts from the stage-1 checkpoint


def test_overrides_are_typed_and_checked():
    config = load_config(
        None, ["learning_rate=2e-6", "gradient_checkpointing=false", "extra_args=--a 1", "pretrain=/m"]
    )
    assert (config.learning_rate, config.gradient_checkpointing, config.extra_args, config.pretrain) == (
        2e-6,
        False,
        ["--a", "1"],
        "/m",
    )
    with pytest.raises(ValueError, match="unknown config key.*'lr'.*valid keys"):
        load_config(None, ["lr=1"])
    with pytest.raises(ValueError, match="n_samples_per_prompt: expected int"):
        load_config(None, ["n_samples_per_prompt=8.5"])
    with pytest.raises(ValueError, match="GRPO normalises"):
        load_config(None, ["n_samples_per_prompt=1"])
    with pytest.raises(ValueError, match="exceeds rollout_max_len"):
        load_config(None, ["prompt_max_len=4000"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(None, ["learning_rate"])


def test_yaml_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("role: reasoner\nlearning_rat: 1.0e-6\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key\(s\) \['learning_rat'\]"):
        load_config(path)


# --- the OpenRLHF command --------------------------------------------------------------------------


def parse_with_openrlhf(argv_lists: list[list[str]]) -> list[dict]:
    """OpenRLHF's own parser and checks, in a subprocess with the GPU-only imports stubbed."""
    env = clean_env(PYTHONPATH=str(STUBS))
    result = subprocess.run(
        [sys.executable, STUBS / "parse_train_ppo_ray.py"], check=False, input=json.dumps(argv_lists),
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_openrlhf_parser_accepts_both_roles_with_the_agent_or_reward_func():
    configs = {role: load_config(CONFIGS / f"{role}_4b.yaml") for role in ("perceiver", "reasoner", "joint")}
    cases = [
        openrlhf_args(configs["perceiver"]),
        openrlhf_args(configs["reasoner"]),
        openrlhf_args(configs["perceiver"], agent=False),  # the launchers' --reward-func
        openrlhf_args(configs["reasoner"], agent=False),
        openrlhf_args(configs["joint"]),  # the joint role always runs the agent
        openrlhf_args(configs["perceiver"]) + ["--algo.kl.coef", "0.01"],  # a wrong flag name
    ]
    perceiver, reasoner, perceiver_func, reasoner_func, joint, wrong = parse_with_openrlhf(cases)

    for args, role in ((perceiver, "perceiver"), (reasoner, "reasoner")):
        _, response, total = LENGTHS[role]
        assert args["algo"]["advantage"]["estimator"] == "group_norm"
        assert args["rollout"]["n_samples_per_prompt"] == 8 and args["rollout"]["batch_size"] == 64
        assert args["train"]["batch_size"] == 64 * 8  # 64 prompts per update, counted in samples
        assert args["actor"]["adam"]["lr"] == 1e-6 and args["actor"]["entropy_coef"] == 0.0
        # AdamW as the release: constant LR, no warm-up, betas (0.9, 0.999), weight decay 0.01, clip 1.0.
        assert args["actor"]["adam"]["betas"] == [0.9, 0.999] and args["actor"]["adam"]["weight_decay"] == 0.01
        assert (args["actor"]["lr_scheduler"], args["actor"]["lr_warmup_ratio"], args["actor"]["max_norm"]) == (
            "constant", 0.0, 1.0,
        )  # fmt: skip
        assert args["train"]["micro_batch_size"] == args["rollout"]["micro_batch_size"] == 8
        assert args["vllm"]["gpu_memory_utilization"] == 0.8
        assert (args["eval"]["steps"], args["eval"]["temperature"], args["eval"]["n_samples_per_prompt"]) == (10, 0.0, 1)
        assert args["eval"]["dataset"].endswith("_val.jsonl")
        assert args["algo"]["kl"] == {**args["algo"]["kl"], "use_loss": True, "estimator": "k3", "init_coef": 0.01}
        assert (args["train"]["num_episodes"], args["train"]["max_epochs"], args["ckpt"]["save_steps"]) == (1, 1, 30)
        assert (args["data"]["max_len"], args["rollout"]["max_new_tokens"]) == (total, response)
        assert (
            args["actor"]["num_gpus_per_node"] == args["ref"]["num_gpus_per_node"] == args["vllm"]["num_engines"] == 4
        )
        assert args["train"]["colocate_all"] and args["ckpt"]["save_hf"] and args["data"]["apply_chat_template"]
        assert (args["data"]["input_key"], args["data"]["label_key"], args["data"]["image_key"]) == (
            "prompt",
            "label",
            "images",
        )
        assert args["critic"]["model_name_or_path"] is None  # GRPO: no critic
    assert perceiver["data"]["max_images_per_prompt"] == 1 and reasoner["data"]["max_images_per_prompt"] == 4
    assert perceiver["actor"]["model_name_or_path"] == BASE_MODEL
    assert reasoner["actor"]["model_name_or_path"] == "runs/perceiver_4b"  # not built here, so left relative
    assert perceiver["ckpt"]["output_dir"] == str(ROOT / "runs/perceiver_4b")
    for args in (perceiver, reasoner, joint):
        assert args["train"]["agent_func_path"] == str(AGENT_FILE.resolve()) and args["reward"]["remote_url"] == [
            "agent"
        ]
    for args, default in ((perceiver_func, perceiver), (reasoner_func, reasoner)):
        assert args["reward"]["remote_url"] == [str(REWARD_FILE.resolve())] and args["train"]["agent_func_path"] is None
        # Only the reward flags differ from the agent run.
        assert {**args, "reward": None, "train": None} == {**default, "reward": None, "train": None}
        assert {**args["train"], "agent_func_path": None} == {**default["train"], "agent_func_path": None}
    assert joint["data"]["max_len"] == 12288 and joint["data"]["max_images_per_prompt"] == 5
    assert wrong["exit"] == 2 and "unrecognized arguments: --algo.kl.coef" in wrong["stderr"]


def test_command_environment_local_and_on_a_ray_cluster():
    config = load_config(CONFIGS / "perceiver_4b.yaml")
    env = {"REASONER_PORT": "19001", "REASONER_API_KEY": "s3cret", "P2R_TIMEOUT_S": "60", "RANK": "0", "HOME": "/h"}
    local = build_command(config, env=env)
    assert local.argv[1:3] == ["-m", "openrlhf.cli.train_ppo_ray"]
    assert local.env == {
        "P2R_TIMEOUT_S": "60", "P2R_ROLE": "perceiver", "P2R_AGENT": "role", "P2R_PERCEIVE_MAX_TOKENS": "1024",
        "REASONER_HOST": "127.0.0.1", "REASONER_PORT": "19001", "REASONER_MODEL": "reasoner", "REASONER_API_KEY": "s3cret",
        "VERIFIER_HOST": "127.0.0.1", "VERIFIER_PORT": "18903", "VERIFIER_MODEL": "verifier", "RAY_ADDRESS": "local",
    }  # fmt: skip
    assert "s3cret" not in local.shell() and "REASONER_API_KEY=***" in local.shell()
    assert local.process_env(env) == {"HOME": "/h", **local.env}  # deepspeed's RANK stays behind
    reward_func = build_command(config, agent=False, env=env)
    assert reward_func.env == {k: v for k, v in local.env.items() if k != "P2R_AGENT"}

    joint = build_command(load_config(CONFIGS / "joint_4b.yaml"), env={})
    assert (joint.env["P2R_AGENT"], joint.env["P2R_ROLE"]) == ("joint", "reasoner") and "REASONER_PORT" not in joint.env
    assert joint.env["P2R_PERCEIVE_MAX_TOKENS"] == "1024" and "P2R_REASON_MAX_TOKENS" not in joint.env  # 2048 default
    stage2 = build_command(load_config(CONFIGS / "reasoner_4b.yaml", ["response_max_len=1500"]), env={})
    assert stage2.env["P2R_REASON_MAX_TOKENS"] == "1500"

    cluster = build_command(config, env={**env, "RAY_ADDRESS": "http://head:8265"})
    assert cluster.argv[1:5] == ["job", "submit", "--address", "http://head:8265"] and cluster.env == {}
    # The variables, the key among them, reach the cluster's workers through a mode-600 file, never argv.
    path = Path(cluster.argv[cluster.argv.index("--runtime-env") + 1])
    assert path == ROOT / "runs/perceiver_4b/ray_runtime_env.json" and list(cluster.files) == [path]
    runtime = json.loads(cluster.files[path])
    assert runtime["env_vars"]["P2R_ROLE"] == "perceiver" and runtime["env_vars"]["REASONER_API_KEY"] == "s3cret"
    assert cluster.argv[cluster.argv.index("--") + 1 :] == local.argv
    assert "s3cret" not in " ".join(cluster.argv) and "s3cret" not in cluster.shell()


# --- launchers ---------------------------------------------------------------------------------------


def test_dry_runs_print_the_command_for_both_roles():
    env = clean_env(VERIFIER_API_KEY="s3cret", VERIFIER_PORT="19003")
    out = launcher("train_perceiver.py", "--dry-run", "--set", "learning_rate=3e-6", env=env)
    assert out.returncode == 0, out.stderr
    assert "-m openrlhf.cli.train_ppo_ray" in out.stdout and "P2R_ROLE=perceiver P2R_AGENT=role" in out.stdout
    assert f"--train.agent_func_path {AGENT_FILE.resolve()}" in out.stdout and "--reward.remote_url" not in out.stdout
    assert "--actor.adam.lr 3e-06" in out.stdout
    for shown in ("--actor.lr_scheduler constant", "--actor.lr_warmup_ratio 0.0", "--actor.adam.betas 0.9 0.999",
                  "--actor.adam.weight_decay 0.01", "--actor.max_norm 1.0", "--train.micro_batch_size 8",
                  "--vllm.gpu_memory_utilization 0.8", "--eval.steps 10", "--eval.temperature 0.0",
                  "P2R_PERCEIVE_MAX_TOKENS=1024", "--eval.dataset data/p2r10k/perceiver_val.jsonl"):  # fmt: skip
        assert shown in out.stdout, shown
    assert "VERIFIER_PORT=19003" in out.stdout and "VERIFIER_API_KEY=***" in out.stdout and "s3cret" not in out.stdout

    out = launcher(
        "train_reasoner.py", "--dry-run", "--reward-func", "--config", "reasoner_8b", "--pretrain", "/ckpt/p1", env=env
    )
    assert out.returncode == 0, out.stderr
    assert "P2R_ROLE=reasoner" in out.stdout and "P2R_AGENT" not in out.stdout and "REASONER_PORT" not in out.stdout
    assert "--actor.model_name_or_path /ckpt/p1" in out.stdout and "--data.max_len 12288" in out.stdout
    assert f"--reward.remote_url {REWARD_FILE.resolve()}" in out.stdout and "--train.agent_func_path" not in out.stdout

    out = launcher("train_perceiver.py", "--dry-run", "--joint", "--reward-func", env=env)
    assert out.returncode == 2 and "the joint role is a two-turn agent" in out.stderr

    out = launcher("train_reasoner.py", "--dry-run", "--config", "perceiver_4b", env=env)
    assert (
        out.returncode == 2
        and "perceiver_4b is a perceiver config; this launcher trains the reasoner role" in out.stderr
    )


def test_alternate_dry_run_prints_every_round(tmp_path):
    run_dir = tmp_path / "alt"
    (run_dir / "round1" / "perceiver").mkdir(parents=True)
    (run_dir / "round1" / "perceiver" / "config.json").write_text("{}")  # stage 1 of round 1 already trained
    argv = [sys.executable, LAUNCH / "alternate.py", "--rounds", "2", "--run-dir", run_dir, "--service-gpus", "4",
            "--train-gpus", "0,1,2,3", "--set", "save_steps=10", "--reward-func", "--dry-run"]  # fmt: skip
    out = run(argv, clean_env())
    assert out.returncode == 0, out.stderr
    titles = [line for line in out.stdout.splitlines() if line.startswith("# ")]
    assert len(titles) == 6 and titles[0].endswith("[done, skipped]") and "[done" not in titles[1]
    r1, r2 = run_dir / "round1", run_dir / "round2"
    lines = out.stdout.splitlines()
    serve_r2 = next(line for line in lines if "start_reasoner_server.sh" in line and str(r1 / "reasoner") in line)
    assert serve_r2.startswith(f"P2R_RUN_DIR={run_dir} CUDA_VISIBLE_DEVICES=4 ")  # round 2's frozen reasoner
    assert any(f"--pretrain {r1 / 'reasoner'}" in line and "train_perceiver.py" in line for line in lines)
    assert any(f"start_perceiver_server.sh {r2 / 'perceiver'}" in line for line in lines)
    assert any(f"--out {r2 / 'stage2'}" in line for line in lines)
    train2 = next(line for line in lines if "train_reasoner.py" in line and str(r2) in line)
    assert train2.startswith("CUDA_VISIBLE_DEVICES=0,1,2,3 ") and "--set=save_steps=10 --reward-func" in train2
    assert all("--reward-func" in line for line in lines if "train_perceiver.py" in line)
    assert f"--dataset {r2 / 'stage2' / 'reasoner.jsonl'}" in train2 and f"--output-dir {r2 / 'reasoner'}" in train2
    # Validation on the held-out slices: the stage-1 data's, and the one the precompute derives from it.
    assert f"--set=eval_dataset={r2 / 'stage2' / 'reasoner_val.jsonl'}" in train2
    train1 = next(line for line in lines if "train_perceiver.py" in line and str(r2) in line)
    assert "--set=eval_dataset=data/p2r10k/perceiver_val.jsonl" in train1


def test_deepspeed_ranks_other_than_0_exit_at_once(tmp_path):
    # Nothing listens on these ports, so a rank that went on would fail its checks (exit 1).
    env = clean_env(REASONER_PORT=str(free_port()), VERIFIER_PORT=str(free_port()))
    args = ["--local_rank=1", "--output-dir", str(tmp_path / "out")]
    out = run([sys.executable, LAUNCH / "train_perceiver.py", *args], {**env, "LOCAL_RANK": "1", "RANK": "1"})
    assert out.returncode == 0 and "rank 1: exiting" in out.stderr and out.stdout == ""
    assert not (tmp_path / "out").exists()
    rank0 = run([sys.executable, LAUNCH / "train_perceiver.py", "--local_rank=0", "--output-dir", str(tmp_path / "out")],
                {**env, "LOCAL_RANK": "0", "RANK": "0"})  # fmt: skip
    assert rank0.returncode == 1 and "not starting perceiver training" in rank0.stderr


@pytest.mark.slow
def test_real_deepspeed_launcher_runs_one_driver():
    env = clean_env()
    argv = [shutil.which("deepspeed", path=env["PATH"]), "--num_gpus", "2", "--master_port", str(free_port()),
            LAUNCH / "train_perceiver.py", "--dry-run"]  # fmt: skip
    out = run(argv, env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("-m openrlhf.cli.train_ppo_ray") == 1  # rank 0 only
    assert "rank 1: exiting" in out.stdout + out.stderr


def test_checks_name_the_missing_service_and_the_wrong_dataset(tmp_path):
    perceive = write_dataset(tmp_path / "perceiver.jsonl", perceiver_row(sample(tmp_path)))
    held_out = write_dataset(tmp_path / "perceiver_val.jsonl", perceiver_row(sample(tmp_path)))
    down = free_port()
    with ScriptedServer(lambda body: "Yes", models=("verifier",)) as verifier:
        env = clean_env(REASONER_PORT=str(down), VERIFIER_PORT=str(verifier.port))
        out = launcher("train_perceiver.py", "--dataset", str(perceive), "--output-dir", str(tmp_path / "o"),
                       "--set", f"eval_dataset={held_out}", env=env)  # fmt: skip
    assert out.returncode == 1
    assert (
        f"reasoner service at http://127.0.0.1:{down}/v1 (REASONER_HOST/REASONER_PORT) is not answering" in out.stderr
    )
    assert "start it with launch/start_reasoner_server.sh" in out.stderr
    assert "verifier" not in out.stderr and "dataset" not in out.stderr
    assert "GPUs (gpus_per_node), 0 visible" in out.stderr  # this machine has none
    assert verifier.calls == 0  # the check lists models; it never spends a chat call

    reason = write_dataset(
        tmp_path / "reasoner.jsonl", prompt_row(sample(tmp_path), reason_text("q?", "mca", True, True), ["a"])
    )
    with ScriptedServer(lambda body: "Yes", models=("judge",)) as verifier:
        env = clean_env(VERIFIER_PORT=str(verifier.port))
        out = launcher("train_reasoner.py", "--dataset", str(perceive), "--pretrain", str(tmp_path), env=env)
        wrong_role = launcher("train_perceiver.py", "--dataset", str(reason), "--pretrain", "/no/such/model", env=env)
    assert out.returncode == 1
    assert f"pretrain {tmp_path} is not an HF checkpoint directory" in out.stderr
    assert "eval_dataset data/stage2_4b/reasoner_val.jsonl not found" in out.stderr
    assert "holds perceive prompts; stage 2 needs the precomputed evidence prompts" in out.stderr
    assert "serves ['judge'], not 'verifier' (VERIFIER_MODEL)" in out.stderr
    assert "holds reasoner prompts" in wrong_role.stderr
    assert "pretrain /no/such/model is neither an HF checkpoint directory nor a hub id" in wrong_role.stderr


# --- service scripts ---------------------------------------------------------------------------------


def test_service_scripts_dry_run_defaults_match_the_clients():
    for role, port in DEFAULT_PORTS.items():
        out = run(
            [LAUNCH / f"start_{role}_server.sh", "--dry-run", "/models/m", "--", "--max-model-len", "9"], clean_env()
        )
        assert out.returncode == 0, out.stderr
        command = out.stdout.splitlines()[0]
        assert command.endswith(
            f"-m vllm.entrypoints.openai.api_server --model /models/m --host 127.0.0.1 --port {port} "
            f"--served-model-name {role} --max-model-len 9"
        )
    out = run([LAUNCH / "start_perceiver_server.sh"], clean_env())
    assert out.returncode == 2 and "give MODEL_PATH or set PERCEIVER_MODEL_PATH" in out.stderr


def test_service_scripts_refuse_empty_keys_open_key_files_and_keyless_public_addresses(tmp_path):
    script = LAUNCH / "start_verifier_server.sh"

    def dry(**env: str) -> subprocess.CompletedProcess:
        return run([script, "--dry-run", "/models/judge"], clean_env(**env))

    out = dry(VERIFIER_API_KEY="")
    assert out.returncode == 2 and "VERIFIER_API_KEY is set but empty" in out.stderr
    out = dry(VERIFIER_HOST="0.0.0.0")
    assert out.returncode == 2 and "VERIFIER_HOST=0.0.0.0 listens beyond loopback: set VERIFIER_API_KEY_FILE" in out.stderr
    key = tmp_path / "verifier.key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    out = dry(VERIFIER_HOST="10.1.2.3", VERIFIER_API_KEY_FILE=str(key))
    assert out.returncode == 2 and "is readable by others (mode 644); chmod 600" in out.stderr
    key.chmod(0o600)
    out = dry(VERIFIER_HOST="10.1.2.3", VERIFIER_API_KEY_FILE=str(key))
    assert out.returncode == 0 and "--host 10.1.2.3" in out.stdout and "api key: set" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr
    key.write_text("\n")
    out = dry(VERIFIER_API_KEY_FILE=str(key))
    assert out.returncode == 2 and "is empty: no key, refused" in out.stderr
    for host in ("127.0.0.1", "localhost", "::1"):
        assert dry(VERIFIER_HOST=host).returncode == 0  # loopback needs no key


def test_service_script_dev_starts_checks_and_stops_p2r_serve(tmp_path, tiny_model_dir):
    port = free_port()
    key = tmp_path / "reasoner.key"
    key.write_text("k3y\n")
    key.chmod(0o600)
    env = clean_env(
        REASONER_PORT=str(port), REASONER_API_KEY_FILE=str(key), P2R_RUN_DIR=str(tmp_path), P2R_SERVE_TIMEOUT_S="180"
    )
    script = LAUNCH / "start_reasoner_server.sh"
    pidfile, log = tmp_path / "services" / "reasoner.pid", tmp_path / "services" / "reasoner.log"
    started = run([script, "--dev", tiny_model_dir], env, timeout=240)
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"ready at http://127.0.0.1:{port}/v1" in started.stdout and log.stat().st_size > 0
        assert "k3y" not in Path(f"/proc/{pid}/cmdline").read_text()  # the key travels by environment
        assert os.getpgid(pid) == pid  # its own process group, so --stop reaches its children
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        assert [m["id"] for m in models["data"]] == ["reasoner"]

        from p2r_recipe.train.launch import service_problem

        assert service_problem("reasoner", env) is None
        bad = tmp_path / "bad.key"
        bad.write_text("bad")
        bad.chmod(0o600)
        assert "refused our API key (REASONER_API_KEY)" in service_problem(
            "reasoner", {**env, "REASONER_API_KEY_FILE": str(bad)}
        )
        again = run([script, "--dev", tiny_model_dir], env)
        assert again.returncode == 1 and "already running" in again.stderr
        taken = run([LAUNCH / "start_verifier_server.sh", "--dev"], {**env, "VERIFIER_PORT": str(port)})
        assert taken.returncode == 1 and f"something already listens on 127.0.0.1:{port}" in taken.stderr

        stopped = run([script, "--stop"], env)
        assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
        assert not pidfile.exists()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    finally:
        if pid and os.path.exists(f"/proc/{pid}"):
            os.killpg(pid, signal.SIGKILL)


def test_alternate_stops_at_a_failed_stage_and_stops_its_service(tmp_path, tiny_model_dir):
    reasoner_port, verifier_port = free_port(), free_port()
    env = clean_env(REASONER_PORT=str(reasoner_port), VERIFIER_PORT=str(verifier_port), P2R_SERVE_TIMEOUT_S="180")
    data = write_dataset(tmp_path / "perceiver.jsonl", perceiver_row(sample(tmp_path)))
    argv = [sys.executable, LAUNCH / "alternate.py", "--rounds", "1", "--run-dir", tmp_path / "alt", "--dev-services",
            "--base", tiny_model_dir, "--data", data]  # fmt: skip
    out = run(argv, env, timeout=300)
    assert out.returncode == 1
    assert f"reasoner: ready at http://127.0.0.1:{reasoner_port}/v1" in out.stdout  # the driver served the base model
    # The launcher found that service, and stopped on what is missing on this machine.
    assert (
        "reasoner service" not in out.stderr
        and f"verifier service at http://127.0.0.1:{verifier_port}/v1" in out.stderr
    )
    assert "stopped: round 1/1: train the perceiver" in out.stderr and "failed (exit 1)" in out.stderr
    assert "reasoner: stopped" in out.stdout and not (tmp_path / "alt" / "services" / "reasoner.pid").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{reasoner_port}/v1/models", timeout=2)


# --- several nodes, and keys outside argv ------------------------------------------------------------


def test_runtime_env_file_is_written_for_its_owner_only(tmp_path):
    config = dataclasses.replace(load_config(CONFIGS / "perceiver_4b.yaml"), output_dir=str(tmp_path / "out"))
    command = build_command(config, env={"REASONER_API_KEY": "s3cret", "RAY_ADDRESS": "https://head:8265"})
    [path] = command.files
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)  # a file left by an earlier run keeps no wider mode
    command.write_files()
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["env_vars"]["REASONER_API_KEY"] == "s3cret"


def test_service_key_from_a_mode_600_file_travels_as_its_path(tmp_path):
    from p2r_recipe.train.command import service_env
    from p2r_recipe.train.services import ServiceConfig

    key = tmp_path / "verifier.key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    env = {"VERIFIER_API_KEY_FILE": str(key), "VERIFIER_API_KEY": "ignored"}
    assert ServiceConfig.from_env("verifier", env).api_key == "s3cret"
    assert service_env(("verifier",), env)["VERIFIER_API_KEY_FILE"] == str(key) and "VERIFIER_API_KEY" not in (
        service_env(("verifier",), env)
    )
    key.chmod(0o640)
    with pytest.raises(ValueError, match=r"readable by others \(mode 640\); chmod 600"):
        ServiceConfig.from_env("verifier", env)
    key.write_text("\n")
    key.chmod(0o600)
    with pytest.raises(ValueError, match="is empty"):
        ServiceConfig.from_env("verifier", env)
    with pytest.raises(ValueError, match="cannot read the key file"):
        ServiceConfig.from_env("verifier", {"VERIFIER_API_KEY_FILE": str(tmp_path / "missing")})
    out = launcher("train_reasoner.py", "--dry-run", env=clean_env(VERIFIER_API_KEY_FILE=str(key)))
    assert out.returncode == 2 and "VERIFIER_API_KEY_FILE" in out.stderr and "is empty" in out.stderr


def two_by_eight(*args: str, **env: str) -> subprocess.CompletedProcess:
    return launcher("train_perceiver.py", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", *args, env=clean_env(**env))


def test_several_nodes_need_a_ray_cluster_and_services_every_node_reaches(tmp_path):
    out = two_by_eight()
    assert out.returncode == 2 and "2 nodes need a Ray cluster: `ray start --head`" in out.stderr
    out = two_by_eight(RAY_ADDRESS="head:6379")
    assert out.returncode == 2 and "give the cluster's dashboard URL (http://HEAD:8265)" in out.stderr

    from p2r_recipe.train.launch import reach_problem

    two_nodes = load_config(None, ["num_nodes=2", "gpus_per_node=8"])
    assert "reachable from this node only, and 2 nodes train" in reach_problem("reasoner", two_nodes, {})
    assert reach_problem("reasoner", two_nodes, {"REASONER_HOST": "10.0.0.5"}) is None
    assert reach_problem("reasoner", load_config(None), {}) is None  # one node: loopback is fine


@pytest.mark.slow
def test_two_nodes_of_eight_gpus_dry_run_is_accepted_by_openrlhf(tmp_path):
    out = two_by_eight(
        "--output-dir", str(tmp_path / "out"), RAY_ADDRESS="http://head:8265", REASONER_HOST="10.0.0.5",
        REASONER_API_KEY="s3cret", VERIFIER_HOST="10.0.0.6",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    runtime_env = tmp_path / "out" / "ray_runtime_env.json"
    assert argv[1:7] == ["job", "submit", "--address", "http://head:8265", "--runtime-env", str(runtime_env)]
    assert "s3cret" not in out.stdout and not runtime_env.exists()  # a dry run writes nothing
    openrlhf = argv[argv.index("--") + 1 :]
    assert openrlhf[1:3] == ["-m", "openrlhf.cli.train_ppo_ray"]
    [args] = parse_with_openrlhf([openrlhf[3:]])
    assert (args["actor"]["num_nodes"], args["actor"]["num_gpus_per_node"]) == (2, 8)
    assert (args["ref"]["num_nodes"], args["ref"]["num_gpus_per_node"]) == (2, 8)
    assert (args["vllm"]["num_engines"], args["vllm"]["tensor_parallel_size"]) == (16, 1)
    assert args["train"]["colocate_all"] and args["train"]["batch_size"] == 64 * 8


RAY_HEAD = """
import sys, time, ray
ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]), num_cpus=1,
         _temp_dir=sys.argv[2])
print("READY", flush=True)
time.sleep(600)
"""
# Stands in for OpenRLHF after `--`: a driver whose Ray worker reports what the runtime env gave it.
RAY_PROBE = """
import os, ray
ray.init()
probe = ray.remote(lambda: " ".join(os.environ[k] for k in ("P2R_ROLE", "REASONER_API_KEY", "P2R_TIMEOUT_S")))
print("WORKER", ray.get(probe.remote()), flush=True)
"""


@pytest.mark.slow
def test_a_ray_cluster_job_gets_its_variables_and_keys_from_the_mode_600_file(tmp_path):
    port = free_port()
    temp = tempfile.mkdtemp(prefix="p2r-ray-", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD, str(port), temp], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        lines = []
        while not lines or lines[-1] not in ("READY\n", ""):  # Ray logs a few lines first; "" is an early exit
            lines.append(head.stdout.readline())
        assert lines[-1] == "READY\n", "".join(lines)
        config = dataclasses.replace(load_config(CONFIGS / "perceiver_4b.yaml"), output_dir=str(tmp_path / "out"))
        env = {"REASONER_API_KEY": "s3cret", "P2R_TIMEOUT_S": "60", "RAY_ADDRESS": f"http://127.0.0.1:{port}"}
        command = build_command(config, env=env)
        command.write_files()
        submit = command.argv[: command.argv.index("--") + 1]
        assert "s3cret" not in " ".join(submit)
        out = run([*submit, sys.executable, "-c", RAY_PROBE], clean_env(), timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "WORKER perceiver s3cret 60" in out.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
