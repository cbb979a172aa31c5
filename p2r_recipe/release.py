"""Every number the project takes from the P2R release, each with the release file and line it comes from.

The release is ZJU-REAL/Perceive-to-Reason at 4c449a97. Files are named by their base name; in full:
batch_inference_vllm.py, run_eval_batch.sh and base_data.py under `evaluation/` (base_data.py in
`evaluation/data_utils/`); p2r_reward.py = `verl/verl/utils/reward_score/p2r_reward.py`; p2r_dataset.py =
`verl/verl/utils/dataset/p2r_dataset.py`; agent_loop.py = `verl/verl/experimental/agent_loop/agent_loop.py`;
_generated_ppo_trainer.yaml = `verl/verl/trainer/config/_generated_ppo_trainer.yaml` (verl's defaults the
training scripts leave alone); run_pra_grpo_perceiver.sh / run_pra_grpo_reasoner.sh (stage 1 / stage 2) =
`example/qwen3_vl_4b_p2r/`. A value the release leaves to a library default says which default.

Plain numbers, strings, tuples and dicts only, importing nothing of the project: every floor may use it, and
the modules that apply a value (pipeline, images, scoring, train.*) import it from here and re-export it under
the name they always had. Prompt strings are not numbers and stay in `prompts`.
"""

# --- Evaluation -----------------------------------------------------------------------------------

# max_tokens per pass: batch_inference_vllm.py:14-20 (MAX_TOKENS; its "p2r-perceive" is "perceive" here).
RELEASE_MAX_NEW_TOKENS = {"default": 16, "thinking": 1024, "p2r": 1024, "perceive": 256}
# One SamplingParams for every pass, batch_inference_vllm.py:80-85: temperature 0 and top_p 1 as
# run_eval_batch.sh:39-40 pass them, repetition_penalty 1.05; top_k and stop unset (vLLM: off, none;
# top_k 0 means off in engines.base.GenParams).
RELEASE_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.05, "stop": ()}
# Per-image pixel budget, the first image and every crop alike: run_eval_batch.sh:42 (--max_pixels
# 4096*32*32) and base_data.py:56-60 (CROP_PIXELS_DIVISOR 1).
EVAL_MAX_PIXELS = 4096 * 32 * 32
# run_eval_batch.sh:43 (--min_pixels 16*32*32).
EVAL_MIN_PIXELS = 16 * 32 * 32

# --- Images, both stages --------------------------------------------------------------------------

# Qwen3-VL's 16-pixel patches merged 2x2, so image sides are multiples of 32: batch_inference_vllm.py:52-53
# (patch_size x SPATIAL_MERGE_SIZE), p2r_dataset.py:198 (service calls), agent_loop.py:294-295 (rollouts).
QWEN_FACTOR = 32

# --- Training -------------------------------------------------------------------------------------

# Per-image pixel cap of rollouts, service calls and crops: run_pra_grpo_perceiver.sh:34 (MAX_PIXELS, passed
# at :49 and :82; run_pra_grpo_reasoner.sh:34 the same), crops alike by p2r_dataset.py:30 (CROP_PIXELS_DIVISOR 1).
TRAIN_MAX_PIXELS = 2_097_152
# p2r_dataset.py:199 (factor*factor*4, the service calls), equal to qwen-vl-utils' default minimum that the
# rollouts get (p2r_dataset.py:415-423 injects max_pixels only).
TRAIN_MIN_PIXELS = 4_096
# The service calls' JPEG: p2r_dataset.py:185 `image.save(buf, format="JPEG")`, PIL's default quality 75.
TRAIN_JPEG_QUALITY = 75
# The request to the frozen reasoner, every field it sends besides model and messages: p2r_reward.py:229-230.
REASONER_PARAMS = {"max_tokens": 2048, "temperature": 0}
# The stage-2 request to the frozen perceiver (`_call_perceiver`), likewise: p2r_dataset.py:303-304.
PERCEIVE_PARAMS = {"max_tokens": 2048, "temperature": 0}
# The verifier request, field for field: p2r_reward.py:162-164.
VERIFIER_PARAMS = {"max_tokens": 64, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
# Any pair of boxes with IoU above this zeroes the perceiver's reward: p2r_reward.py:54 (BBOX_IOU_THRESHOLD).
IOU_LIMIT = 0.5
# Training's option letters, whatever the question lists: p2r_reward.py:102-104 ("[ABCDE]").
TRAINING_LETTERS = "ABCDE"

# --- Training: PRA-GRPO hyper-parameters (stage 1 unless named) ------------------------------------

# GRPO group size: run_pra_grpo_perceiver.sh:70 (rollout.n=8).
GROUP_SIZE = 8
# Prompts per rollout batch: run_pra_grpo_perceiver.sh:41 (data.train_batch_size=64).
ROLLOUT_BATCH_PROMPTS = 64
# Prompts per update: run_pra_grpo_perceiver.sh:56 (ppo_mini_batch_size=64), one update per step.
UPDATE_BATCH_PROMPTS = 64
# Micro-batch per GPU for the update, rollout log-probs and reference: run_pra_grpo_perceiver.sh:57, :62, :71.
MICRO_BATCH_PER_GPU = 8
# run_pra_grpo_perceiver.sh:53 (optim.lr=1e-6).
LEARNING_RATE = 1e-6
# _generated_ppo_trainer.yaml:23 (lr_scheduler_type: constant).
LR_SCHEDULER = "constant"
# _generated_ppo_trainer.yaml:13 (lr_warmup_steps_ratio: 0.0).
LR_WARMUP_RATIO = 0.0
# AdamW betas: _generated_ppo_trainer.yaml:17-19.
ADAM_BETAS = (0.9, 0.999)
# _generated_ppo_trainer.yaml:15 (weight_decay: 0.01).
WEIGHT_DECAY = 0.01
# Gradient-norm clip: _generated_ppo_trainer.yaml:20 (clip_grad: 1.0) and :144 (grad_clip: 1.0).
MAX_GRAD_NORM = 1.0
# KL as a loss: run_pra_grpo_perceiver.sh:59 (kl_loss_coef=0.01).
KL_LOSS_COEF = 0.01
# run_pra_grpo_perceiver.sh:60 (kl_loss_type=low_var_kl), which OpenRLHF calls k3.
KL_ESTIMATOR = "k3"
# run_pra_grpo_perceiver.sh:61 (entropy_coeff=0).
ENTROPY_COEF = 0.0
# run_pra_grpo_perceiver.sh:94 (total_epochs=1).
EPOCHS = 1
# Checkpoint every this many steps: run_pra_grpo_perceiver.sh:92 (save_freq=30).
SAVE_STEPS = 30
# Validation every this many steps: run_pra_grpo_perceiver.sh:93 (test_freq=10).
EVAL_STEPS = 10
# Rollout temperature: _generated_ppo_trainer.yaml:231 (temperature: 1.0).
ROLLOUT_TEMPERATURE = 1.0
# Validation decoding: _generated_ppo_trainer.yaml:272-273 (val_kwargs temperature 0, n 1).
EVAL_TEMPERATURE = 0.0
# _generated_ppo_trainer.yaml:273 (val_kwargs n: 1).
EVAL_SAMPLES_PER_PROMPT = 1
# Stage-1 prompt length: run_pra_grpo_perceiver.sh:42 (max_prompt_length=2560).
PERCEIVER_PROMPT_MAX_LEN = 2560
# Stage-1 response cap: run_pra_grpo_perceiver.sh:43 (max_response_length=1024).
PERCEIVER_RESPONSE_MAX_LEN = 1024
# Stage-2 response cap: run_pra_grpo_reasoner.sh:43 (max_response_length=2048).
REASONER_RESPONSE_MAX_LEN = 2048
# Stage-1 rollout context: run_pra_grpo_perceiver.sh:66 (max_model_len=4096).
PERCEIVER_ROLLOUT_MAX_LEN = 4096
# run_pra_grpo_perceiver.sh:91 (trainer.nnodes=1).
NUM_NODES = 1
# run_pra_grpo_perceiver.sh:90 (n_gpus_per_node=4).
GPUS_PER_NODE = 4
# run_pra_grpo_perceiver.sh:63 (tensor_model_parallel_size=1).
ROLLOUT_TENSOR_PARALLEL = 1
# run_pra_grpo_perceiver.sh:65 (gpu_memory_utilization=0.8).
ROLLOUT_GPU_MEMORY = 0.8
