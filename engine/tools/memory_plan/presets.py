"""Published model shapes that `minidisc plan` knows by name (data only: the help text lists them)."""

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
_OPT = dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0)


PRESETS = {  # published shapes: hidden, FFN, layers, query heads, KV heads
    "llama-2-7b": ("llama", dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32)),
    "llama-2-13b": ("llama", dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40)),
    "llama-2-70b": ("llama", dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "llama-3-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8)),
    "llama-3-70b": ("llama", dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "opt-1.3b": ("opt", dict(_OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32)),
    "opt-6.7b": ("opt", dict(_OPT, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)),
    "opt-13b": ("opt", dict(_OPT, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)),
    "opt-30b": ("opt", dict(_OPT, hidden_size=7168, num_hidden_layers=48, num_attention_heads=56)),
}
