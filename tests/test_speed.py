"""The fast paths of issue 27: each equals the plain path in fp64; `rankscope info` lists the study's preset."""

from __future__ import annotations

from rankscope.cli import main


def test_info_lists_pico_tiny_body_with_body_and_embeddings_apart(capsys):
    main(["info"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    params, body, emb = (int(v.replace(",", "")) for v in rows["pico-tiny-body"][7:10])
    # 12 blocks of (4 attention + 3 FFN matrices, 2 norms) + final norm; untied 2,048 x 96 embedding and head
    block = 96 * 96 * 2 + 96 * 32 * 2 + 96 * 384 * 3 + 2 * 96
    assert body == 12 * block + 96 == 1_624_416
    assert emb == 2 * 2048 * 96 and params == body + emb
    assert rows["pico-tiny"][8] == rows["pico-tiny-body"][8]  # the same body
