#!/usr/bin/env python3
"""Writes what Python's jinja2, set up as transformers sets it up for chat templates, renders for
the project's Jinja tests (tests/test_jinja.cpp):

  tests/fixtures/chat_templates/expected.jsonl   every template in tests/fixtures/chat_templates/
      and the Mistral v0.3 tokenizer's own, on several conversations, with and without the
      generation prompt: {"template", "conversation", "add_generation_prompt", "variables",
      "text"} or, where the template raises, {..., "error": its message}
  tests/fixtures/chat_templates/features.jsonl   small templates, one language feature or a few
      each: {"name", "template", "variables", "text"} or {..., "error": "Type: message"}

Run from the repository root: python3 scripts/make_jinja_fixtures.py (needs jinja2; Debian:
python3-jinja2). The environment is transformers' (utils/chat_template_utils.py):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
extension and a {% generation %} tag, `tojson` as json.dumps(x, ensure_ascii=False, indent=...,
separators=..., sort_keys=False), globals raise_exception and strftime_now. strftime_now is pinned
to 2024-07-26 12:00 here; the C++ tests pin it to the same time.
"""
import datetime
import glob
import json
import os

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

FIXTURES = os.path.join("tests", "fixtures", "chat_templates")
MISTRAL_CONFIG = os.path.join("tests", "fixtures", "tokenizers", "mistral-v0.3", "tokenizer_config.json")


class Generation(Extension):
    """transformers' AssistantTracker without the tracking: {% generation %} renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(format):
    return datetime.datetime(2024, 7, 26, 12, 0).strftime(format)


ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
ENV.filters["tojson"] = tojson
ENV.globals["raise_exception"] = raise_exception
ENV.globals["strftime_now"] = strftime_now

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {"id": "call0abcd", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, who are you?"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "whitespace": [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "  hi there \n"},
        {"role": "assistant", "content": "\n hello  "},
        {"role": "user", "content": "\tbye\r\n"},
    ],
    "unicode_and_braces": [
        {"role": "user", "content": "Grüße, 世界! 🙂 {{ not a template }} {% raw %}"},
        {"role": "assistant", "content": "¡Hola! café\u2028\"quoted\" 'single' \\ backslash"},
    ],
    "assistant_first": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hello"}],
    "tools": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call0abcd", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 °C."},
    ],
}


def render(template, variables):
    try:
        return {"text": ENV.from_string(template).render(**variables)}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def chat_templates():
    out = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.jinja"))):
        with open(path, encoding="utf-8") as f:
            out.append((os.path.basename(path), f.read()))
    with open(MISTRAL_CONFIG, encoding="utf-8") as f:
        out.append(("mistral-v0.3/tokenizer_config.json", json.load(f)["chat_template"]))
    return out


def write_expected():
    lines = []
    for name, template in chat_templates():
        for conversation, messages in CONVERSATIONS.items():
            for add_generation_prompt in (False, True):
                variables = {
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                }
                if conversation == "tools":
                    variables["tools"] = TOOLS
                row = {
                    "template": name,
                    "conversation": conversation,
                    "add_generation_prompt": add_generation_prompt,
                    "variables": variables,
                }
                row.update(render(template, variables))
                lines.append(row)
    with open(os.path.join(FIXTURES, "expected.jsonl"), "w", encoding="utf-8") as f:
        for row in lines:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


VARS = {
    "messages": [
        {"role": "system", "content": " Sys "},
        {"role": "user", "content": "Hi é"},
        {"role": "assistant", "content": "Yo\n"},
    ],
    "x": {"b": 1, "a": [1, 2.0, "é\u2028\x7f\x01", None, True]},
    "s": "  Hello, World  ",
    "n": 7,
    "f": 2.5,
    "l": [3, 1, 2],
    "e": [],
    "t": "héllo wörld",
}

# (name, template[, variables]): each checks a language feature, or a few, against jinja2.
FEATURES = [
    ("arithmetic", "{{ 1 + 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} "
     "{{ 2 ** -1 }} {{ 3 * 'ab' }} {{ [1] * 3 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }} {{ 10 - 2 - 3 }}"),
    ("float_and_int_literals", "{{ 1.0 }} {{ 1e16 }} {{ 1e15 }} {{ 0.1 + 0.2 }} {{ 1_000 }} {{ 0x1f }} {{ 0b101 }} "
     "{{ 0o17 }} {{ 1.5e3 }} {{ 10 / 4 }} {{ 10 // 4.0 }} {{ 10 % 4.5 }} {{ 2 ** 0.5 }}"),
    ("concat_and_str", "{{ 'a' ~ 1 ~ none ~ true ~ u }}|{{ [1, 'a', none, true, 1.5, {'k': ['x']}, (1,2), (1,)] }}"),
    ("tojson", "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(ensure_ascii=true) }}|"
     "{{ x|tojson(separators=(',', ':'), sort_keys=true) }}|{{ 'a\"b\\\\c\\n'|tojson }}|{{ none|tojson }}"),
    ("strip_and_split", "{{ s|trim }}|{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' H') }}|"
     "{{ s|trim(' d') }}|{{ s.split() }}|{{ s.split(',') }}|{{ s.split(None, 1) }}|{{ s.split(',', 0) }}"),
    ("string_methods", "{{ s.startswith('  H') }}{{ s.endswith(('x', '  ')) }}{{ s.upper() }}{{ s.lower() }}"
     "{{ s|upper }}{{ s|lower }}{{ s.title() }}{{ s|title }}{{ s|capitalize }}{{ s.replace('l', 'L') }}"
     "{{ s.replace('l', 'L', 1) }}{{ s|replace('l', '_') }}{{ 'x'.join(['a', 'b']) }}{{ 'abc'.index('c') }}"
     "{{ 'A1'.isalnum() }}{{ '12'.isdigit() }}{{ ' '.isspace() }}{{ 'ab'.islower() }}"),
    ("slicing_code_points", "{{ t[1:3] }}{{ t[::-1] }}{{ t[-2:] }}{{ t|length }}{{ t[1] }}{{ t[-1] }}"
     "{{ t.find('w') }}{{ t.count('l') }}{{ t|reverse }}{{ l[::-1] }}{{ l[1:] }}{{ l[:-1] }}{{ l[::2] }}{{ l[5:] }}"),
    ("loop_variables", "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}"
     "{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem.role if loop.previtem is defined }}|"
     "{{ loop.nextitem.role if loop.nextitem is defined }}{{ loop.cycle('a','b') }};{% endfor %}"),
    ("loop_filter_and_else", "{% for m in messages if m.role != 'system' %}{{ m.role }}{{ loop.index }}"
     "{{ loop.length }}{% else %}none{% endfor %}{% for m in e %}x{% else %}empty{% endfor %}"),
    ("loop_unpacking", "{% for k, v in x.items() %}{{ k }}={{ v }};{% endfor %}{% for k in x %}{{ k }}{% endfor %}"
     "{% for c in 'ab' %}{{ c }}{% endfor %}{% for a, b in [(1, 2), [3, 4]] %}{{ a + b }}{% endfor %}"),
    ("loop_controls", "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 5 %}{% break %}"
     "{% endif %}{{ i }}{% endfor %}{{ range(3)|list }}{{ range(1, 10, 3)|list }}{{ range(5, 0, -2)|list }}"),
    ("namespace", "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'user' %}"
     "{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }}{{ ns.n }}"
     "{{ ns['n'] }}{{ ns.missing }}{{ namespace(a=1) }}{{ dict(a=1, b='x') }}"),
    ("scoping", "{% set a = 1 %}{% for i in range(3) %}{{ a }}{% set a = i %}{{ a }}{% endfor %}{{ a }}"
     "{% if true %}{% set a = 5 %}{% endif %}{{ a }}{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = (1, 2) %}{{ t }}"),
    ("set_shadows_a_variable", "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
     "{% set messages = messages[1:] %}{% endif %}{{ sys }}{{ messages|length }}{{ messages[0].role }}"),
    ("macros", "{% macro m(x, y='d') %}<{{ x }}|{{ y }}>{% endmacro %}{{ m(1) }}{{ m(1, 2) }}{{ m(y=3, x=4) }}"
     "{{ m() }}{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %}{% endmacro %}"
     "{{ fact(5) }}"),
    ("block_set_and_filter_block", "{% set b %}  block {{ n }} {% endset %}[{{ b }}]{% set c | upper %}up"
     "{% endset %}{{ c }}{% filter upper %}filtered {{ s }}{% endfilter %}"),
    ("tests", "{{ n is defined }}{{ u is defined }}{{ u is undefined }}{{ none is none }}{{ s is string }}"
     "{{ n is number }}{{ f is number }}{{ n is integer }}{{ f is integer }}{{ f is float }}{{ x is mapping }}"
     "{{ l is iterable }}{{ l is sequence }}{{ s is sequence }}{{ n is iterable }}{{ u is iterable }}"
     "{{ true is boolean }}{{ true is true }}{{ false is false }}{{ 4 is even }}{{ 3 is odd }}"
     "{{ 9 is divisibleby 3 }}{{ 9 is divisibleby(4) }}{{ 3 is equalto 3 }}{{ 'a' is eq 'a' }}"
     "{{ n is not none }}{{ x is not string }}{{ 'ab' is lower }}{{ 2 is in l }}{{ none is sameas none }}"),
    ("list_filters", "{{ l|sort }}{{ l|sort(reverse=true) }}{{ ['b','A','a']|sort }}"
     "{{ ['b','A','a']|sort(case_sensitive=true) }}{{ ['b','A','a']|unique|list }}{{ l|max }}{{ l|min }}"
     "{{ l|sum }}{{ l|first }}{{ l|last }}{{ l|list }}{{ l|join(', ') }}{{ l|length }}{{ l|count }}"
     "{{ [1,2,3].index(2) }}{{ [1,1,2].count(1) }}{{ l|reverse|list }}{{ 'ab'|list }}"),
    ("select_and_map", "{{ messages|selectattr('role', 'equalto', 'user')|list }}"
     "{{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|list }}"
     "{{ messages|map(attribute='content')|map('trim')|join('/') }}{{ [1,2,3,4]|select('odd')|list }}"
     "{{ [1,2,3,4]|reject('odd')|list }}{{ [0,1,'',none,'a']|select|list }}"
     "{{ messages|map(attribute='nope', default='d')|list }}{{ messages|selectattr('nope', 'defined')|list }}"
     "{{ ['a', 'b', 'code']|reject('equalto', 'code')|join(', ') }}"),
    ("conversion_filters", "{{ u|default('dflt') }}{{ ''|default('dflt') }}{{ ''|default('dflt', true) }}"
     "{{ u|d('x') }}{{ none|default('n') }}{{ n|string }}{{ '3.7'|int }}{{ '3.7'|float }}{{ 'x'|int(5) }}"
     "{{ 3.9|int }}{{ '0x1A'|int(0, 16) }}{{ -3|abs }}{{ 2.5|round }}{{ 3.5|round }}{{ 2.567|round(2) }}"
     "{{ 2.5|round(0, 'floor') }}{{ 2.1|round(0, 'ceil') }}{{ 3|float }}{{ ' 12 '|int }}{{ true|int }}"),
    ("indent_items_dict", "{{ 'a\\nb\\n\\nc'|indent(2) }}|{{ 'a\\nb'|indent(2, true) }}|"
     "{{ 'a\\n\\nb'|indent('> ', blank=true) }}|{{ x|items|list }}|{{ x|dictsort }}|{{ x.keys()|list }}"
     "{{ x.values()|list }}{{ x.get('b') }}{{ x.get('zz', 9) }}{{ x.get('zz') }}"),
    ("comparisons", "{{ 'a' in 'cat' }}{{ 'z' not in 'cat' }}{{ 1 in l }}{{ 'b' in x }}{{ 1 < 2 < 3 }}"
     "{{ 3 > 2 > 5 }}{{ 'a' < 'b' }}{{ [1,2] < [1,3] }}{{ 1 == 1.0 }}{{ true == 1 }}{{ [1,2] == (1,2) }}"
     "{{ {'a':1} == {'a':1} }}{{ none == none }}{{ u == u }}{{ u == none }}{{ 1 in u }}"),
    ("logic_and_ternary", "{{ 'yes' if n > 3 else 'no' }}{{ 'yes' if n > 30 }}|{{ n > 3 and 'a' or 'b' }}"
     "{{ 0 or '' or 'c' }}{{ not n }}{{ not u }}{{ -n }}{{ +n }}{{ (1, 2) }}{{ () }}{{ {'a': 1, 'b': [2]} }}"),
    ("item_and_attribute_access", "{{ messages[0]['content'] }}{{ messages[0].content }}{{ messages[5] }}"
     "{{ messages[-1].role }}{{ messages[0].missing }}{{ x['a'][1] }}{{ x.a.0 }}{{ x['zz'] }}{{ x.a[2]|tojson }}"),
    ("undefined_is_lenient", "{{ 1 if true }}{{ u|length }}{{ u|list }}{{ u|join }}{{ u|first }}{{ u|trim }}[{{ u }}]"
     "{% for i in u %}x{% endfor %}{{ u|string }}{{ u is none }}"),
    ("precedence", "{{ 'a' 'b' }}{{ 3 - -2 }}{{ 2 * 3 + 4 }}{{ 2 + 3 * 4 }}{{ (2 + 3) * 4 }}{{ 'a' ~ 2 * 3 }}"
     "{{ s | trim | upper | replace('HELLO', 'bye') }}{{ 'a' + s|trim }}{{ (s|trim)[:3] }}{{ -2|abs }}"),
    ("string_literals", "{{ \"it's\" }} {{ ['it\\'s', 'a\"b', 'x\\ny', '\\t\\x01', 'é'] }} {{ '\\u00e9\\x41\\101\\q' }}"),
    ("strftime_now", "{{ strftime_now('%d %b %Y') }} {{ strftime_now('%Y-%m-%d') }}"),
    ("generation_block", "{% generation %}abc{% endgeneration %}x{% generation %}{{ n }}{% endgeneration %}"),
    ("whitespace_control", "{%- if true -%}\n  a  \n{%- endif -%}\n  b\n{{- ' c ' -}}\n d \n{#- c -#}\n e"),
    ("trim_and_lstrip_blocks", "  {% if true %}\n  x\n  {% endif %}\n  y {% if true %} z {% endif %}\n"
     "{# comment #}\nw\n  {#- c #}  v\n{%+ if true %}p{% endif %}\n\t{% if true %}\t\n{% endif %}\n"),
    ("raw", "{% raw %}{{ not rendered }}{% endraw %}\n{%- raw -%}  {% x %}  {%- endraw %}|"),
    ("newlines", "a\r\nb\rc\n"),
    ("llama31_style_date_and_tools",
     "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
     "{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
     "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
     "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
     "{%- for t in tools %}\n    {{- t | tojson(indent=4) }}\n    {{- \"\\n\\n\" }}\n{%- endfor %}\n"
     "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n"
     "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
     "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",
     {"messages": [{"role": "system", "content": " Be nice. "}, {"role": "user", "content": "Hi"}],
      "tools": TOOLS, "bos_token": "<|begin_of_text|>", "add_generation_prompt": True}),
    ("qwen3_style_reverse_scan",
     "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
     "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
     "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
     "and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n"
     "        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n"
     "{%- for message in messages %}\n    {%- if message.role == \"assistant\" %}\n"
     "        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
     "        {%- if loop.index0 > ns.last_query_index %}\n"
     "            {{- '<|im_start|>assistant\\n<think>\\n' + message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') + '\\n</think>\\n\\n' + content }}\n"
     "        {%- else %}\n            {{- '<|im_start|>assistant\\n' + content }}\n        {%- endif %}\n"
     "        {{- '<|im_end|>\\n' }}\n    {%- else %}\n"
     "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
     "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
     "    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
     "    {%- endif %}\n{%- endif %}\n",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nb"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>x</think>d"}],
      "add_generation_prompt": True, "enable_thinking": False}),
    ("recursive_macro_over_json_schema",
     "{%- macro py_type(spec) -%}\n{%- set m = {'string': 'str', 'number': 'float', 'integer': 'int'} -%}\n"
     "{%- if spec.type is defined and spec.type in m -%}{{ m[spec.type] }}\n"
     "{%- elif spec.type == 'array' -%}list[{{ py_type(spec['items']) }}]\n"
     "{%- elif spec.type == 'object' -%}dict[str, {{ py_type(spec.additionalProperties) if spec.additionalProperties is defined else 'Any' }}]\n"
     "{%- elif spec is mapping and spec.enum is defined -%}Literal[{{ spec.enum|map('tojson')|join(', ') }}]\n"
     "{%- else -%}Any{%- endif -%}\n{%- endmacro -%}\n"
     "{%- for name, p in schema.properties|items %}{{ name }}: {{ py_type(p) }}\n{% endfor %}",
     {"schema": {"properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                                "c": {"type": "object", "additionalProperties": {"type": "number"}}, "d": {"enum": ["x", 1]},
                                "e": {}}}}),
    ("gemma3_style_content_parts",
     "{%- for message in messages -%}\n{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}\n"
     "{%- if message['content'] is string -%}\n{{ message['content'] | trim }}\n"
     "{%- elif message['content'] is iterable -%}\n{%- for item in message['content'] -%}\n"
     "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}\n"
     "{%- endfor -%}\n{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}\n{{ '<end_of_turn>\\n' }}\n{%- endfor -%}",
     {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}]},
                   {"role": "assistant", "content": " A cat. "}]}),
    # Errors: jinja2 raises; the C++ tests check that the engine raises too.
    ("error_list_append", "{{ l.append(4) }}"),
    ("error_dict_pop", "{{ x.pop('a') }}"),
    ("error_str_plus_int", "{{ 'a' + 1 }}"),
    ("error_attribute_of_undefined", "{{ u.x }}"),
    ("error_undefined_arithmetic", "{{ u + 1 }}"),
    ("error_raise_exception", "{{ raise_exception('boom') }}"),
    ("error_for_syntax", "{% for %}"),
    ("error_unknown_filter", "{{ x|nofilter }}"),
    ("error_unclosed_if", "{% if true %}"),
    ("error_division_by_zero", "{{ 1 / 0 }}"),
    ("error_range_too_big", "{{ range(200000)|length }}"),
    ("error_break_outside_loop", "{% break %}"),
    ("error_unknown_tag", "{% include 'x.j2' %}"),
    ("error_compare_str_int", "{{ 'a' < 1 }}"),
    ("error_none_not_iterable", "{% for x in none %}{% endfor %}"),
]


def write_features():
    lines = []
    for name, template, *rest in FEATURES:
        variables = rest[0] if rest else VARS
        row = {"name": name, "template": template, "variables": variables}
        try:
            row["text"] = ENV.from_string(template).render(**variables)
        except Exception as e:  # any failure: the engine must fail as well
            row["error"] = f"{type(e).__name__}: {e}"
        lines.append(row)
    with open(os.path.join(FIXTURES, "features.jsonl"), "w", encoding="utf-8") as f:
        for row in lines:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


def main():
    expected = write_expected()
    features = write_features()
    errors = sum("error" in r for r in expected)
    print(f"expected.jsonl: {len(expected)} renders ({errors} raise); features.jsonl: {len(features)} cases "
          f"(jinja2 {jinja2.__version__})")


if __name__ == "__main__":
    main()
