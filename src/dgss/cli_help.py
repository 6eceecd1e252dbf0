"""What ``dgss COMMAND --help`` says besides its options: what the command does, and real examples.

The documentation site renders the same text as each command's page, so a description says what the
command is for, what it reads and writes and what it refuses; every example is a command that runs as
written once its data and weights are in place (the config paths are the shipped configs, which resolve
also after a plain ``pip install``: :func:`dgss.config.resolve_config_path`).
"""

from __future__ import annotations

__all__ = ["SUMMARIES", "DESCRIPTIONS", "EXAMPLES", "epilog"]

# One line each: `dgss --help` lists them.
SUMMARIES: dict[str, str] = {
    "backbones": "list the supported VFM backbones with parameter counts",
    "config": "validate a config as `dgss train` does and print it fully resolved",
    "configs": "list, print or copy the configs that ship with dgss",
    "train": "train a model (iterations, checkpoints, --resume; torchrun for several GPUs)",
    "eval": "evaluate a model on every data.test dataset (mIoU tables, JSON + Markdown)",
    "predict": "segment images, folders and videos with a trained model (colour masks, overlays, ids)",
    "export": "export a trained model to ONNX or TorchScript (fixed input size, methods folded)",
    "plan": "memory per process of a config before it runs: fits or not, and the smallest change that fits",
    "convert": "turn an FSDP checkpoint (train.parallel=fsdp) into a plain model file for eval and predict",
    "fisher": "FisherTune stages 1-2 alone: DR-FIM scores, selection and plots",
    "compare": "run or collect several methods on one protocol and write the comparison table",
    "demo": "run the built-in end-to-end demo on CPU (synthetic domains)",
}

_CHECKPOINT_FORMS = ("--checkpoint takes a model file (RUN/model_final.safetensors), a training checkpoint "
                     "(either half of RUN/checkpoints/iter_N), a run folder (its final model, else its newest "
                     "checkpoint) or an official Rein / released SoMA .pth.")
_CONVENTION = ("--device chooses where the model runs and --no-progress replaces the progress bars by log "
               "lines; without a terminal (a pipe, a SLURM log) there are log lines only, unless the command "
               "line asks for bars with train.progress_bar=true.")

DESCRIPTIONS: dict[str, str] = {
    "backbones": "The backbones model.backbone accepts (names are case- and -/_-insensitive: dinov2-l and "
                 "DINOv2-L mean dinov2_l), with their timm architecture, parameter count at the given input "
                 "size, the blocks whose outputs feed the head, and how the 4-scale pyramid is made. Nothing "
                 "is downloaded: the models are built on the meta device.",
    "config": "Loads CONFIG with its _base_ files and the key=value overrides, runs every check `dgss train` "
              "runs before it builds a model (keys, types, values, backbone/method/head/dataset names, "
              "dataset options), and prints the fully resolved config as YAML. With --check-files it also "
              "checks the files train reads first (backbone weights, every dataset root), so it refuses "
              "exactly what `dgss train` refuses before building the model. CONFIG may be a file or the name of a "
              "shipped config (see `dgss configs list`).",
    "configs": "The configs ship inside the package. `list` names them (one folder per method, plus "
               "datasets/, eval/ and examples/), `show` prints one, and `copy` copies configs or whole folders "
               "with every _base_ file they inherit from into ./configs (or --to DIR) for editing. A local "
               "file always wins over a shipped one of the same path, so after a copy the documented commands "
               "run your edited version.",
    "train": "Trains the experiment CONFIG describes into RUN = output_dir/name: RUN/config.yaml (the "
             "resolved config), RUN/checkpoints/, RUN/logs/ (TensorBoard, metrics.jsonl) and "
             "RUN/model_final.safetensors. Before the model is built it checks the config as `dgss config` "
             "does, the backbone weights file and the root of every dataset it will read, data.test "
             "included, so a wrong path fails in the first second, not after the run. SIGTERM or SIGUSR1 "
             "(preemption, SLURM's --signal) makes every process finish its step; the run writes a "
             "checkpoint of that iteration and exits with status 75 (continue with --resume or "
             "--auto-resume). A save that finds the disk full stops with one line (status 2), the previous "
             "checkpoint intact. " + _CONVENTION,
    "eval": "Evaluates a model on every dataset of data.test with the config's eval settings (eval.mode: "
            "sliding window, whole image or coarse to fine, and eval.scale; --mode and --scale set them) and "
            "prints and writes RUN/eval/results.json and results.md "
            "(per-class IoU, mIoU per dataset, mean over the targets), each dataset as soon as it is done. "
            + _CHECKPOINT_FORMS + " " + _CONVENTION,
    "predict": "Segments images, folders (searched recursively) and videos, and writes one sub-folder of "
               "--out per format. A broken input is reported on one line and skipped; the status is 1 when "
               "any failed. The model's own config (stored in dgss model files) sets the inference; an "
               "official Rein or released SoMA .pth needs --config. " + _CHECKPOINT_FORMS + " "
               + _CONVENTION,
    "export": "Writes the model as ONNX (model.onnx) or TorchScript (model.pt) at a fixed input size, with "
              "the tuning method folded into the backbone where it can be; the file takes B x 3 x H x W RGB "
              "0..255 and returns scores and labels. " + _CHECKPOINT_FORMS,
    "plan": "Prints, before anything runs, the memory one process needs to train CONFIG: weights, "
            "gradients, AdamW state, activations at its batch and crop, DDP/FSDP buffers, FisherTune's "
            "estimate; the evaluation at the config's eval settings (whole image and sliding window); a "
            "table of variants (fp32/bf16 x activation checkpointing x DDP/FSDP); and, with --gpu-memory, "
            "whether it fits and the smallest change that makes it fit. No weights are read and nothing "
            "is allocated: the model is built on the meta device. Here --device names the device planned "
            "for, not the one it runs on.",
    "convert": "Turns an FSDP checkpoint (RUN/checkpoints/iter_N.dcp, written under train.parallel=fsdp) into a "
               "plain dgss model file that eval, predict and export read. --checkpoint takes the .dcp folder, "
               "its .fsdp.pt file, a checkpoints folder or a run folder (their newest). The older form with "
               "the checkpoint as the first positional argument still works.",
    "fisher": "Runs FisherTune's stages 1 and 2 alone (head warm-up, the domain-related Fisher information, the "
              "selection of the entries to train) and writes report.json, selection.safetensors and the "
              "plots to the run folder (or --out). Use it to inspect the selection, or to compute it on one "
              "large GPU before a sharded run (method.fishertune.selection_file=OUT/selection.safetensors). "
              + _CONVENTION,
    "compare": "Trains and evaluates (or only collects, with --no-run) several methods on one protocol and "
               "writes table.md, table.csv and miou.png. A method's run is the published config of that "
               "method for the same protocol when there is one, else the protocol config with "
               "method.name=METHOD; a run made by `dgss train` under another name is found by its recorded "
               "RUN/config.yaml. A run on disk is reused only when its config.yaml matches the requested "
               "experiment: a difference in any key that changes the experiment (all but where it writes, "
               "what it shows and how fast it runs: dgss.config.NON_EXPERIMENT_KEYS) is refused with the "
               "keys named, before anything runs. An interrupted run of the same config is resumed from its "
               "newest checkpoint. " + _CONVENTION,
    "demo": "The domain-generalization story on a CPU with synthetic street scenes: a small shipped "
            "foundation ViT fine-tuned on one synthetic domain with Frozen, Full, Rein and FisherTune, "
            "evaluated on five domains never used for training; prints the mIoU table and writes charts, "
            "overlays and every run to --out. --device applies to --pretrain-ssl (the demo itself runs "
            "on the CPU).",
}

# (comment, command) pairs: real commands, shown under "examples:" in the help.
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "backbones": [
        ("the zoo at 512 x 512, patch 16 (the published settings)", "dgss backbones"),
        ("parameter counts at the 1024 recipe's input size", "dgss backbones --img-size 1024"),
    ],
    "config": [
        ("check a config and print it with every default filled in", "dgss config configs/rein/dinov2-l_gtav_512.yaml"),
        ("everything dgss train checks before it starts, the weights file and dataset folders included",
         "dgss config configs/fishertune/dinov2-l_gtav_512.yaml --check-files"),
        ("the same with overrides, saved as one self-contained file",
         "dgss config configs/rein/dinov2-l_gtav_512.yaml train.batch_size=2 train.grad_accum=2 --save my_rein.yaml"),
    ],
    "configs": [
        ("every shipped config", "dgss configs list"),
        ("the configs of one method", "dgss configs list rein"),
        ("print one", "dgss configs show rein/dinov2-l_gtav_512.yaml"),
        ("copy it (and its _base_ files) to ./configs, edit, train the copy",
         "dgss configs copy rein/dinov2-l_gtav_512.yaml && dgss train configs/rein/dinov2-l_gtav_512.yaml"),
    ],
    "train": [
        ("Rein on DINOv2-L, GTAV -> Cityscapes / BDD100K / Mapillary (40,000 iterations, one GPU)",
         "dgss train configs/rein/dinov2-l_gtav_512.yaml"),
        ("FisherTune, with the GTAV download somewhere else",
         "dgss train configs/fishertune/dinov2-l_gtav_512.yaml data.train.0.root=/datasets/gtav"),
        ("a complete run on a CPU in a few minutes (synthetic scenes, no download)",
         "dgss train configs/examples/synthetic_cpu.yaml --device cpu"),
        ("the same command for every attempt of a requeued SLURM job",
         "dgss train configs/rein/dinov2-l_gtav_512.yaml --auto-resume --no-progress"),
        ("four GPUs, Cityscapes -> ACDC at 1024",
         "torchrun --nproc-per-node 4 -m dgss train configs/fishertune/dinov2-l_citys2acdc_1024.yaml"),
    ],
    "eval": [
        ("a run of dgss train: its final model", "dgss eval configs/rein/dinov2-l_gtav_512.yaml --checkpoint runs/rein_dinov2-l_gtav_512"),
        ("the authors' released Rein checkpoint (DINOv2-L, GTAV)",
         "dgss eval configs/rein/dinov2-l_gtav_512.yaml --checkpoint checkpoints/dinov2_rein_and_head.pth"),
        ("a Cityscapes-trained model on the adverse-condition sets",
         "dgss eval configs/eval/rein_dinov2-l_adverse.yaml --checkpoint runs/rein_dinov2-l_citys2acdc_1024"),
        ("every target at twice the loader's size (Cityscapes: 2048 x 1024), written elsewhere",
         "dgss eval configs/rein/dinov2-l_gtav_512.yaml --checkpoint runs/rein_dinov2-l_gtav_512 --scale 2 "
         "--out runs/rein_dinov2-l_gtav_512/eval_x2"),
        ("whole-image inference on a CPU (the synthetic example run)",
         "dgss eval configs/examples/synthetic_cpu.yaml --checkpoint runs/synthetic_cpu --device cpu --mode whole"),
    ],
    "predict": [
        ("colour masks of a folder of images", "dgss predict street/ --checkpoint runs/rein_dinov2-l_gtav_512 --out preds"),
        ("videos and images, colour + overlay, flip test-time augmentation",
         "dgss predict frames/ drive.mp4 --checkpoint runs/rein_dinov2-l_gtav_512 --out preds --format colour,overlay "
         "--tta flip"),
        ("the released Rein checkpoint (it stores no config)",
         "dgss predict street.png --checkpoint checkpoints/dinov2_rein_and_head.pth --config "
         "configs/rein/dinov2-l_gtav_512.yaml --out preds"),
        ("ACDC test label-id PNGs for the benchmark server",
         "dgss predict data/acdc/rgb_anon --checkpoint runs/rein_dinov2-l_citys2acdc_1024 --out acdc_test "
         "--format labelids"),
    ],
    "export": [
        ("ONNX at the model's eval crop size", "dgss export --checkpoint runs/rein_dinov2-l_gtav_512 --out rein.onnx"),
        ("TorchScript at 512 x 1024 on the CPU",
         "dgss export --checkpoint runs/rein_dinov2-l_gtav_512 --out rein.pt --input-size 512 1024 --device cpu"),
    ],
    "plan": [
        ("does FisherTune on DINOv2-L fit a 24 GB GPU?", "dgss plan configs/fishertune/dinov2-l_gtav_512.yaml --gpu-memory 24GB"),
        ("DINOv3-7B on 8 x 80 GB, as JSON",
         "dgss plan configs/rein/dinov3-7b_gtav_512.yaml --gpus 8 --gpu-memory 80GB --json"),
        ("a smaller batch with accumulation",
         "dgss plan configs/rein/dinov2-l_gtav_512.yaml train.batch_size=2 train.grad_accum=2 --gpu-memory 16GB"),
    ],
    "convert": [
        ("the newest checkpoint of an FSDP run",
         "dgss convert --checkpoint runs/rein_dinov3-7b_gtav_512 --out rein_7b.safetensors"),
        ("one checkpoint, with the run's config given",
         "dgss convert --checkpoint runs/rein_dinov3-7b_gtav_512/checkpoints/iter_0020000.dcp --out rein_7b_20k.safetensors "
         "--config configs/rein/dinov3-7b_gtav_512.yaml"),
    ],
    "fisher": [
        ("the selection of the published FisherTune config",
         "dgss fisher configs/fishertune/dinov2-l_gtav_512.yaml"),
        ("with the split-half stability of the rankings, written elsewhere",
         "dgss fisher configs/fishertune/dinov2-l_gtav_512.yaml --stability --out fisher_dinov2-l"),
        ("on a CPU with synthetic scenes", "dgss fisher configs/examples/synthetic_cpu.yaml --device cpu --out fisher_cpu"),
    ],
    "compare": [
        ("the table of four finished runs (nothing is trained)",
         "dgss compare configs/frozen/dinov2-l_gtav_512.yaml --methods frozen,full,rein,fishertune --no-run"),
        ("train what is missing, then the table",
         "dgss compare configs/frozen/dinov2-l_gtav_512.yaml --methods frozen,rein,fishertune,lora --out compare_gtav"),
        ("a comparison on a CPU in minutes",
         "dgss compare configs/examples/synthetic_cpu.yaml --methods frozen,rein,fishertune --device cpu"),
    ],
    "demo": [
        ("a one-minute check that everything runs", "dgss demo --quick"),
        ("the full demo (three seeds per method, about 5 minutes on 2 cores)", "dgss demo --out demo_output"),
        ("two methods, one seed", "dgss demo --methods frozen,fishertune --seeds 1 --out demo_small"),
    ],
}


def epilog(command: str) -> str:
    """The "examples:" block of ``command``'s help (kept as written: the parser uses a raw formatter)."""
    lines = ["examples:"]
    for comment, example in EXAMPLES.get(command, []):
        lines += [f"  # {comment}", f"  {example}"]
    return "\n".join(lines)
