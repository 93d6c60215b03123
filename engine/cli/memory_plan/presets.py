"""Published model shapes that `minidisc plan` knows by name (data only: the help text lists them)."""

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
_OPT = dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.1, attention_dropout=0.0)
_MISTRAL = dict(vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0)
_QWEN25 = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)
_QWEN3 = dict(vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, head_dim=128)


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
    "mistral-7b": ("mistral", dict(_MISTRAL, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, sliding_window=4096)),
    "qwen2.5-0.5b": ("qwen2", dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)),
    "qwen3-0.6b": ("qwen3", dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8)),
    "opt-1.3b": ("opt", dict(_OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32)),
    "opt-6.7b": ("opt", dict(_OPT, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)),
    "opt-13b": ("opt", dict(_OPT, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)),
    "opt-30b": ("opt", dict(_OPT, hidden_size=7168, num_hidden_layers=48, num_attention_heads=56)),
}
