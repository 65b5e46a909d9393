"""Let lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness) drive a megalm model.

    import lm_eval
    from megalm.inference.lm_eval_adapter import MegalmLM
    results = lm_eval.simple_evaluate(model=MegalmLM.from_checkpoint("ckpt"), tasks=["hellaswag"])

or, on the command line, after `import megalm.inference.lm_eval_adapter` has registered it:
`--model megalm --model_args load=ckpt,batch_size=8`. The three request types map onto
`megalm.inference.evaluate` and `megalm.inference.generate`:

- loglikelihood (context, continuation) -> (summed log-probability, is it the greedy continuation);
- loglikelihood_rolling (text,) -> summed log-probability of the whole text, the first token
  conditioned on the end-of-document token, by windows of the model's length;
- generate_until (context, {"until", "max_gen_toks", "do_sample", "temperature"}) -> the text
  generated, cut before the first stop string.

lm_eval is optional: this module imports without it, and `MegalmLM` then refuses to be built.
"""

from __future__ import annotations

from typing import Optional

from megalm.inference.evaluate import encode_pair, loglikelihoods, stream_nll
from megalm.inference.generate import SamplingParams, generate

try:
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # the harness is not installed
    _LM, _register_model = object, None


class MegalmLM(_LM):
    def __init__(self, loaded, batch_size: int = 8, max_length: Optional[int] = None):
        if _LM is object:
            raise ImportError("MegalmLM needs lm-evaluation-harness: pip install lm_eval")
        super().__init__()
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer; lm-evaluation-harness works on text")
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or loaded.config.model.max_positions)

    @classmethod
    def from_checkpoint(cls, load: str, batch_size: int = 8, max_length: Optional[int] = None,
                        device: Optional[str] = None, dtype: Optional[str] = None) -> "MegalmLM":
        from megalm.inference.loading import load_model
        return cls(load_model(load, device=device, dtype=dtype), batch_size, max_length)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MegalmLM":
        args = dict(part.split("=", 1) for part in arg_string.split(",") if part)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra:
            args.setdefault("batch_size", extra["batch_size"])
        if "device" in extra:
            args.setdefault("device", extra["device"])
        return cls.from_checkpoint(args.pop("load"), **args)

    def _prefix(self) -> list:
        eod = self.tokenizer.eod
        return [eod] if eod is not None else []

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        pairs = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            if context:
                pairs.append(encode_pair(self.tokenizer.encode, context, continuation))
            else:
                pairs.append((self._prefix(), self.tokenizer.encode(continuation)))
        return loglikelihoods(self.model, pairs, self.loaded.vocab_size, self.max_length, self.batch_size,
                              progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for request in requests:
            tokens = self._prefix() + self.tokenizer.encode(request.args[0])
            if len(tokens) < 2:
                out.append(0.0)
                continue
            total, _ = stream_nll(self.model, tokens, self.max_length, self.max_length - 1, self.loaded.vocab_size,
                                  progress=False)
            out.append(-total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            prompt = (self.tokenizer.encode(context) or self._prefix())[-max(self.max_length - max_new, 1):]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop_strings=until,
                                    seed=kwargs.get("seed", 1234))
            result = generate(self.model, [prompt], params, vocab_size=self.loaded.vocab_size,
                              eod=self.tokenizer.eod, decode=self.tokenizer.decode)[0]
            out.append(result.text)
        return out


if _register_model is not None:
    _register_model("megalm")(MegalmLM)
