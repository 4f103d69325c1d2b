from kvstore.hashing import BlockHasher, block_hashes, hash_block, model_fingerprint

TOKENS = list(range(40))


def test_only_full_blocks_are_hashed_and_each_chains_on_its_parent():
    hashes = block_hashes(TOKENS, 16)
    assert len(hashes) == 2 and all(len(h) == 32 for h in hashes)
    assert hashes[0] == hash_block(None, TOKENS[:16])
    assert hashes[1] == hash_block(hashes[0], TOKENS[16:32])
    assert hashes[1] != hash_block(None, TOKENS[16:32])


def test_a_block_hash_depends_on_every_token_before_it():
    changed = [99] + TOKENS[1:]
    assert block_hashes(changed, 16)[1] != block_hashes(TOKENS, 16)[1]
    assert block_hashes(TOKENS + [1] * 8, 16)[:2] == block_hashes(TOKENS, 16)


def test_salts_and_extra_keys_never_collide():
    tokens = TOKENS[:16]
    variants = [
        hash_block(None, tokens),
        hash_block(None, tokens, salt=""),
        hash_block(None, tokens, salt="x"),
        hash_block(None, tokens, extra_keys={"lora": "x"}),
        hash_block(None, tokens, extra_keys={"x": ""}),
        hash_block(None, tokens, salt="x", extra_keys={"lora": "x"}),
    ]
    assert len(set(variants)) == len(variants)


def test_the_incremental_hasher_matches_the_one_shot_hashes():
    hasher = BlockHasher(4, salt="t")
    hasher.update(TOKENS[:6])
    assert hasher.update(TOKENS[:13]) == block_hashes(TOKENS[:13], 4, salt="t")


def test_the_hasher_reads_only_the_first_num_tokens():
    hasher = BlockHasher(4)
    assert hasher.update(TOKENS, num_tokens=9) == block_hashes(TOKENS[:9], 4)
    assert hasher.update(TOKENS, num_tokens=100) == block_hashes(TOKENS, 4)


def test_hashes_are_stable_across_releases():
    # Pinned values: a change here orphans every block already in Redis. Bump HASH_VERSION on purpose instead.
    assert block_hashes([0] * 16, 16)[0].hex() == "7f1e58c6232a64f711f76a7a80f7b3041139fd67707d5aedc251564e88117c47"
    assert hash_block(None, [1, 2, 3], salt="t").hex() == (
        "cd7ceac91f9f3ef1b503eed2fb12ae7c33c64c490512443fbc05704a0f5f1a64"
    )


def test_fingerprints_change_with_the_model_dtype_block_size_and_weights():
    base = model_fingerprint({"hidden_size": 64}, "torch.float32", 16, "w1")
    assert len(base) == 64
    assert base == model_fingerprint({"hidden_size": 64}, "torch.float32", 16, "w1")
    others = [
        model_fingerprint({"hidden_size": 128}, "torch.float32", 16, "w1"),
        model_fingerprint({"hidden_size": 64}, "torch.bfloat16", 16, "w1"),
        model_fingerprint({"hidden_size": 64}, "torch.float32", 32, "w1"),
        model_fingerprint({"hidden_size": 64}, "torch.float32", 16, "w2"),
    ]
    assert base not in others and len(set(others)) == 4
