"""`rmt-deploy export`: write a bundle of shared and/or folded models for a base and its tasks."""
from __future__ import annotations

from pathlib import Path

import click

from rmt_deploy.export import MASKED_INPUT_KINDS, MODES, OPSETS, TARGETS, ExportConfig, export_bundle

RANDOM_WEIGHTS = "none"
TRITON = "triton"


@click.command("export")
@click.option("--model", "model_name", required=True, help="open_clip model name, e.g. ViT-B-16.")
@click.option("--pretrained", required=True,
              help=f"pretrained tag or checkpoint file of the base the tasks were trained on "
                   f"('{RANDOM_WEIGHTS}' for random weights).")
@click.option("--task", "tasks", multiple=True, required=True, type=click.Path(path_type=Path),
              help="a .rmtask file; repeat for several tasks.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="bundle directory to write.")
@click.option("--target", type=click.Choice(TARGETS + (TRITON,)), default="onnx", show_default=True,
              help="onnx; trt: ONNX plus TensorRT engines (NVIDIA GPU with TensorRT >= 10); triton: a Triton "
                   "model repository (the bundle as a Python-backend model; folded tasks as onnxruntime models).")
@click.option("--mode", type=click.Choice(MODES), default="shared", show_default=True,
              help="shared: one base graph + tasks; folded: one self-contained model per task; both.")
@click.option("--fp16", is_flag=True, help="fp16 weights and activations (LayerNorm, softmax in fp32).")
@click.option("--opset", type=click.IntRange(OPSETS.start, OPSETS.stop - 1), default=18, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="largest batch the TensorRT profile accepts (ONNX batch is unbounded).")
@click.option("--masked-inputs", type=click.Choice(MASKED_INPUT_KINDS), default="required", show_default=True,
              help="required: the runtime feeds masked weights (least memory); defaults: base values "
                   "as initializer defaults, so base.onnx runs unfed in any ONNX client.")
@click.option("--triton-model", "triton_model", default="rmt", show_default=True, help="--target triton: the Engine model's name.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="--target triton: labels and probabilities per answer.")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out.")
@click.option("--no-verify", is_flag=True, help="skip onnx.checker and the comparison against torch.")
@click.option("--quiet", is_flag=True, help="no progress bar.")
def export(model_name: str, pretrained: str, tasks: tuple[Path, ...], out: Path, target: str, mode: str,
           fp16: bool, opset: int, max_batch: int, masked_inputs: str, triton_model: str, top_k: int, force: bool,
           no_verify: bool, quiet: bool) -> None:
    """Export a base model and its tasks (.rmtask) into a bundle for the runtime."""
    config = ExportConfig(
        model_name=model_name,
        pretrained=None if pretrained.lower() == RANDOM_WEIGHTS else pretrained,
        task_paths=list(tasks), out=out, target=target, mode=mode, fp16=fp16, opset=opset,
        max_batch=max_batch, force=force, verify=not no_verify, masked_inputs=masked_inputs,
    )
    if target == TRITON:
        from rmt_deploy.serving.triton_repo import ServingConfig, export_repository

        models = export_repository(config, ServingConfig(model_name=triton_model, top_k=top_k, max_batch=max_batch),
                                   progress=not quiet)
        click.echo(f"wrote Triton model repository {out}: {', '.join(models)}")
        return
    report = export_bundle(config, progress=not quiet)
    click.echo(report.table())
