// @ts-check
// Calls Encode, Classify and GenerateStream on a running server and prints what came back as one
// JSON object; a failed call is reported as {code, details} instead of its result.
//   node examples/call.js 127.0.0.1:50051 ENCODER_MODEL CLASSIFIER_MODEL GENERATOR_MODEL
"use strict";

const { OnnxServeClient } = require("..");

/**
 * @template T
 * @param {() => Promise<T>} call
 * @returns {Promise<{result: T} | {code: number, details: string}>}
 */
async function outcome(call) {
  try {
    return { result: await call() };
  } catch (error) {
    const { code, details } = /** @type {import("..").grpc.ServiceError} */ (error);
    return { code, details };
  }
}

/**
 * @param {OnnxServeClient} client
 * @param {string} model
 */
async function streamPieces(client, model) {
  const pieces = [];
  for await (const piece of client.generateStream({ model, prompt: "Hello", parameters: { maxNewTokens: 5 } })) {
    pieces.push({ text: piece.text, finishReason: piece.finishReason, generatedText: piece.generatedText });
  }
  return pieces;
}

async function main() {
  const [target, encoder, classifier, generator] = process.argv.slice(2);
  const client = new OnnxServeClient(target, { timeoutMs: 60_000 });
  try {
    const texts = ["A man is eating food.", "Café au lait 🙂"];
    const report = {
      encode: await outcome(() => client.encode({ model: encoder, texts, normalize: true })),
      classify: await outcome(() => client.classify({ model: classifier, texts, topK: 1 })),
      generateStream: await outcome(() => streamPieces(client, generator)),
    };
    process.stdout.write(JSON.stringify(report) + "\n");
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
