"""Generate answers for a few chat prompts in one batch with the default model.

    python examples/offline_generate.py
"""

from streamgen import OfflineGenerator, SamplingParams, load_model

loaded = load_model()  # SmolLM2-135M-Instruct, fetched and converted on first use
questions = ["Tell me the capital of France.", "Name three primary colors."]
prompts = [
    loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
    )
    for q in questions
]
outputs = OfflineGenerator(loaded).generate(prompts, SamplingParams(temperature=0, max_tokens=48))
for question, output in zip(questions, outputs, strict=True):
    print(f"> {question}\n{loaded.tokenizer.decode(output, skip_special_tokens=True)}\n")
