"""Run LLaMA-Factory's own argument parser (`get_train_args`, 0.9.5) on YAML files: one JSON line per file,
{"path", "ok", "error"}. Runs under the LLaMA-Factory virtualenv's python (.ci/llamafactory_venv.sh), never
memplan's; test_llamafactory_parser.py drives it.

On this CPU machine three things of a GPU launch are stood in for, and nothing else: `use_cpu: true` is added
(HF TrainingArguments refuses bf16 on a CPU without it), the torchrun environment of one rank is set (parser.py
refuses DeepSpeed outside torchrun: "Please use `FORCE_TORCHRUN=1`"), and the parser's bf16-GPU probe answers
yes (`pure_bf16` checks it). Everything the parser checks of the YAML itself runs as LLaMA-Factory runs it.
"""

import json
import os
import sys

os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ.get("MASTER_PORT", "29561"), DS_ACCELERATOR="cpu",
                  LLAMAFACTORY_VERBOSITY="WARN", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

import yaml  # noqa: E402
from llamafactory.hparams import get_train_args, parser  # noqa: E402
from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: E402

parser.is_torch_bf16_gpu_available = lambda: True


def check(path: str) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    try:
        _, _, training, _, _ = get_train_args({**cfg, "use_cpu": True})
        return {"path": path, "ok": True, "error": None, "deepspeed": training.deepspeed,
                "fsdp": [str(getattr(o, "value", o)) for o in training.fsdp]}
    except (ValueError, TypeError, KeyError, ImportError) as err:  # what the parser raises for a bad config
        return {"path": path, "ok": False, "error": f"{type(err).__name__}: {err}"}
    finally:
        unset_hf_deepspeed_config()  # a ZeRO-3 config must not leak into the next file's checks


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(check(p)), flush=True)
