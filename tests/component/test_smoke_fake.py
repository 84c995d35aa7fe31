from tests.helpers import app_client, fake_config


async def test_fake_embedding_roundtrip():
    async with app_client(fake_config()) as (client, engine):
        r = await client.post("/v1/embeddings", json={"input": ["hello world", "bye"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert len(body["data"][0]["embedding"]) == 32
