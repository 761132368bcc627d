"""An agent loop with the official ``openai`` client against Djinn's OpenAI-compatible API.

Nothing here is Djinn-specific: the agent resends the whole conversation every turn and runs
its tools locally. Djinn recognises the answer to its own tool calls, keeps the session's KV
across the tool call (IO_WAIT while the tool runs) and computes only the new tokens, which
``usage.prompt_tokens_details.cached_tokens`` shows.

    djinn serve --model smollm2-135m --http-port 8000        # or: python -m djinn.server.http --model ...
    python examples/openai_agent_loop.py --base-url http://127.0.0.1:8000/v1 --api-key KEY
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def get_weather(city: str) -> str:
    """The tool: a stand-in for a real weather service."""
    return json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})


def run(client: OpenAI, model: str, question: str, max_turns: int = 3) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant. Use tools when they help."},
                {"role": "user", "content": question}]
    for turn in range(max_turns):
        # the first turn must call the tool; later turns may answer in words
        choice = {"type": "function", "function": {"name": "get_weather"}} if turn == 0 else "auto"
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=40)
        msg = r.choices[0].message
        djinn = (r.model_extra or {}).get("djinn", {})
        print(f"turn {turn + 1}: finish={r.choices[0].finish_reason} prompt={r.usage.prompt_tokens} "
              f"cached={r.usage.prompt_tokens_details.cached_tokens} session={djinn.get('session_id')} "
              f"matched_by={djinn.get('matched_by')}", flush=True)
        entry = {"role": "assistant", "content": msg.content}
        if msg.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in msg.tool_calls]
        messages.append(entry)
        if not msg.tool_calls:
            print(f"answer: {msg.content}")
            return messages
        for call in msg.tool_calls:
            result = get_weather(**json.loads(call.function.arguments))
            print(f"tool {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="djinn")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--question", default="What is the weather in Paris?")
    p.add_argument("--max-turns", type=int, default=3)
    args = p.parse_args()
    run(OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0), args.model, args.question,
        args.max_turns)


if __name__ == "__main__":
    main()
