"""Small configurations and runs shared by the tests."""

from megalm.arguments import parse_args

TINY = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "32", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--log-interval", "1", "--eval-iters", "0", "--seed", "7"]


def tiny_config(*flags):
    """A validated Config for a tiny mock-data model; later flags override TINY's."""
    import pretrain_gpt
    config, _ = parse_args(TINY + list(flags))
    config.validate()
    pretrain_gpt.set_vocabulary(config)
    return config


def run(config, log_stream=None):
    """Train in this process; returns the TrainState (history = [(iteration, loss)])."""
    import io

    import pretrain_gpt
    from megalm.training.trainer import Trainer
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                      log_stream=log_stream or io.StringIO())
    try:
        return trainer.train()
    finally:
        trainer.close()
