"""KV memory pool bookkeeping (plain Python; the tensors live in the worker)."""
from orca_serve.kv_cache.block_pool import BlockPool, KVBlock
from orca_serve.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVBlock", "KVCacheManager"]
