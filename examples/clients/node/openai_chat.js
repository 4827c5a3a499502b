#!/usr/bin/env node
// The official `openai` npm client against llmcluster's OpenAI-compatible HTTP gateway
// (`llmcluster up` serves it on 127.0.0.1:8000): streams one chat completion.
//
//   node openai_chat.js --base-url http://127.0.0.1:8000/v1 \
//       --model SmolLM2-135M-Instruct --prompt "Name three rivers." --max-tokens 32
//
// Prints the streamed text as it arrives, then one JSON summary as the last line:
// {"chunks", "contentChunks", "role", "text", "finishReason", "usage", "ids"}; with an
// error (unknown model, bad parameter) the summary is {"error": {status, code, param,
// message}} and the exit code is still 0, so callers can compare errors too.
"use strict";

const OpenAI = require("openai");

const USAGE = `usage: node openai_chat.js [--base-url URL] [--model NAME] [--prompt TEXT]
  [--max-tokens N] [--temperature X] [--api-key KEY]
  --api-key / $OPENAI_API_KEY: sent as 'Authorization: Bearer' (the gateway ignores it
  unless the router runs with --auth-file)`;

function parseArgs(argv) {
  const args = {
    baseUrl: "http://127.0.0.1:8000/v1",
    model: "SmolLM2-135M-Instruct",
    prompt: "Name three rivers.",
    maxTokens: 32,
    temperature: 0,
    apiKey: process.env.OPENAI_API_KEY || "unused",
  };
  const numeric = { "--max-tokens": "maxTokens", "--temperature": "temperature" };
  const text = { "--base-url": "baseUrl", "--model": "model", "--prompt": "prompt",
    "--api-key": "apiKey" };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag in text) args[text[flag]] = value();
    else if (flag in numeric) {
      const n = Number(value());
      if (!Number.isFinite(n)) throw new Error(`${flag} needs a number`);
      args[numeric[flag]] = n;
    } else if (flag === "-h" || flag === "--help") {
      console.log(USAGE);
      process.exit(0);
    } else {
      throw new Error(`unknown flag ${flag}\n${USAGE}`);
    }
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = new OpenAI({ baseURL: args.baseUrl, apiKey: args.apiKey, maxRetries: 0 });
  const summary = { chunks: 0, contentChunks: 0, role: null, text: "", finishReason: null,
    usage: null, ids: [] };
  try {
    const stream = await client.chat.completions.create({
      model: args.model,
      messages: [{ role: "user", content: args.prompt }],
      max_tokens: args.maxTokens,
      temperature: args.temperature,
      stream: true,
      stream_options: { include_usage: true },
    });
    for await (const chunk of stream) {
      summary.chunks += 1;
      if (!summary.ids.includes(chunk.id)) summary.ids.push(chunk.id);
      if (chunk.usage) summary.usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.role) summary.role = choice.delta.role;
      if (choice.delta.content) {
        summary.contentChunks += 1;
        summary.text += choice.delta.content;
        process.stdout.write(choice.delta.content);
      }
      if (choice.finish_reason) summary.finishReason = choice.finish_reason;
    }
    process.stdout.write("\n");
    console.log(JSON.stringify(summary));
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) throw err;
    console.log(JSON.stringify({ error: { status: err.status, code: err.code ?? null,
      param: err.param ?? null, message: err.message } }));
  }
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
