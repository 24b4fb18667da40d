"""Distributed training of the sequential recommenders with Ray Train, from the LanceDB feature store.

    run_training(settings dict) -> RunResult     training.run: the driver side (checks, TorchTrainer, results)
    train_loop(config dict)                      training.loop: what every Ray Train worker runs
    TrainConfig                                  training.config: the settings and their defaults
"""
from training.config import TrainConfig
from training.run import RunResult, run_training

__all__ = ["TrainConfig", "RunResult", "run_training"]
