"""Chat templates for GGUFs that carry none, one per model family, written to render a
conversation the way that family's reference template does (tests compare them).

Jinja, rendered by worker/chat_template.py in a sandbox with the variables Hugging Face's
`apply_chat_template` passes: messages, tools, add_generation_prompt, bos_token, eos_token.
Tool calls arrive with `function.arguments` as a mapping (as in Hugging Face).
"""

from __future__ import annotations

# Gemma 2/3: no system role; the system text opens the first user turn; "assistant" is
# "model"; turns must alternate (the adapter merges and maps roles before rendering).
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}"""

# ChatML (Qwen 2.5 and others): tools in the system turn inside <tools></tools>, calls as
# <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response> in a user turn.
CHATML = """{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0]['role'] == 'system' -%}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' and loop.first -%}
    {%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {{- '\\n<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

# Llama 3.x: header-delimited turns; tools (3.1 style) as JSON in the first user turn; a call
# is {"name", "parameters"}; results come back in "ipython" turns.
LLAMA3 = """{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- set first_user = namespace(done=false) -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {%- for call in message['tool_calls'] -%}
            {{- '{"name": "' + call['function']['name'] + '", "parameters": ' + (call['function']['arguments'] | tojson) + '}' -}}
        {%- endfor -%}
        {{- '<|eot_id|>' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
    {%- elif message['role'] == 'user' and tools and not first_user.done -%}
        {%- set first_user.done = true -%}
        {{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format {\\"name\\": function name, \\"parameters\\": dictionary of argument name and its value}. Do not use variables.\\n\\n' -}}
        {%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}
        {{- message['content'] | trim + '<|eot_id|>' -}}
    {%- else -%}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"""

# Mistral instruct: [INST] turns; a system text and the tools go before the last user turn;
# calls as [TOOL_CALLS] [{"name", "arguments"}], results as [TOOL_RESULTS] ... [/TOOL_RESULTS].
MISTRAL = """{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- set last_user = namespace(index=-1) -%}
{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}{%- set last_user.index = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {%- if tools and loop.index0 == last_user.index -%}
            {{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}
        {%- endif -%}
        {%- if system_message and loop.index0 == last_user.index -%}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}
        {%- else -%}
            {{- '[INST] ' + message['content'] + ' [/INST]' -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}
        {{- '[TOOL_CALLS] [' -}}
        {%- for call in message['tool_calls'] -%}
            {{- '{"name": "' + call['function']['name'] + '", "arguments": ' + (call['function']['arguments'] | tojson) + '}' -}}
            {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
        {%- endfor -%}
        {{- ']' + eos_token -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- message['content'] + eos_token + ' ' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '[TOOL_RESULTS] {"content": ' + (message['content'] | tojson) + '}[/TOOL_RESULTS]' -}}
    {%- endif -%}
{%- endfor -%}"""

BY_FAMILY = {"gemma": GEMMA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}

# The family of an architecture whose GGUF carries no template.
ARCHITECTURE_FAMILIES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "phi3": "chatml", "falcon": "chatml", "mpt": "chatml", "deepseek2": "chatml",
    "llama": "llama3", "mistral": "mistral",
}
