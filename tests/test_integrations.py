"""The Lightning and Hugging Face callbacks with the real libraries on CPU: loadable run
directories, the automatic groups, norms before the frameworks' gradient clipping."""
import numpy as np
import pytest
import torch
from torch import nn

import stabilitylab as sl
from stabilitylab.cli import main

pytestmark = pytest.mark.slow


def test_lightning_run_directory(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    import timm

    from stabilitylab.integrations.lightning import StabilityMonitor

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 1e-2})
            torch.manual_seed(0)
            self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                                           patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = lambda: torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1e-4,
                        accumulate_grad_batches=2, val_check_interval=4, limit_val_batches=2,
                        default_root_dir=tmp_path,
                        callbacks=[StabilityMonitor(tmp_path / "run", metrics={"val_acc": "val"})])
    trainer.fit(Classifier(), loader(), loader())
    run = sl.load_run(tmp_path / "run")
    assert run.layers["update_rms_over_lr"].notna().all()  # the optimizer-state probe saw every step
    assert run.meta["status"] == "finished" and run.meta["source"] == "lightning"
    assert run.steps["step"].tolist() == list(range(6))  # optimizer steps, not micro-batches
    assert list(run.grad_norms().columns) == ["patch_embed", "cls_token", "pos_embed", "blocks.0",
                                              "blocks.1", "norm", "head"]
    assert (run.steps["grad_norm"] > 100 * 1e-4).all()  # before Lightning's clipping to 1e-4
    assert run.steps["loss"].notna().all() and (run.steps["lr"] == 1e-2).all()
    assert run.config["hparams"] == {"lr": 1e-2} and run.config["accumulate_grad_batches"] == 2
    assert run.knn["source"].unique().tolist() == ["val"] and run.knn["top1"].between(0, 1).all()
    assert main(["analyze", str(tmp_path / "run")]) == 0


def test_huggingface_trainer_run_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from stabilitylab.integrations.huggingface import StabilityCallback

    def model():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=2, max_position_embeddings=16))

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(24)]

    def fit(name, callbacks):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=4,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=0.05,
            eval_strategy="steps", eval_steps=3, learning_rate=1e-2, seed=0, data_seed=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(
            model=model(), args=args, train_dataset=data, eval_dataset=data[:8], callbacks=callbacks,
            compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
        trainer.train()
        return trainer

    plain = fit("plain", [])
    monitored = fit("monitored", [StabilityCallback(tmp_path / "run", metrics={"eval_accuracy": "val"})])
    run = sl.load_run(tmp_path / "run")
    assert run.layers["update_rms_over_lr"].notna().all()  # the optimizer-state probe saw every step
    assert run.meta["status"] == "finished" and run.meta["norms"] == "before gradient clipping"
    assert list(run.grad_norms().columns) == ["embeddings", "blocks.0", "blocks.1", "pooler", "classifier"]
    logged = [h for h in monitored.state.log_history if "grad_norm" in h]
    np.testing.assert_allclose(run.steps["grad_norm"], [h["grad_norm"] for h in logged], rtol=1e-5)
    assert (run.steps["grad_norm"] > 0.05).all()  # the Trainer's own pre-clipping norm, unclipped
    np.testing.assert_allclose(run.steps["loss"], [h["loss"] for h in logged], rtol=1e-5)
    assert monitored.args.max_grad_norm == 0.05  # restored
    for a, b in zip(plain.model.parameters(), monitored.model.parameters()):  # same clipping
        torch.testing.assert_close(a, b)
    assert run.knn["source"].unique().tolist() == ["val"] and len(run.knn) == 2
    assert run.config["model"]["num_hidden_layers"] == 2
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
