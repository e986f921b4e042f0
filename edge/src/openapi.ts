/** OpenAPI 3.1 description of the public API, served at `GET /openapi.json`. */
import { ERROR_STATUS } from "../../shared/src/errors.ts";

const errorRef = { $ref: "#/components/schemas/Error" };
const errorResponse = (description: string) => ({ description, content: { "application/json": { schema: errorRef } } });

const vqaFields = {
  question: { type: "string", minLength: 1, description: "The question about the image." },
  options: { type: "array", items: { type: "string", minLength: 1 }, minItems: 2, maxItems: 10, description: "Answer options; shown to the model as A) …, B) …" },
  max_new_tokens: { type: "integer", minimum: 1, description: "Default 1024 (model card), capped by the server." },
  max_pixels: { type: "integer", minimum: 1, description: "Lowers the server's per-image pixel cap (never raises it)." },
  min_pixels: { type: "integer", minimum: 1 },
  resized_height: {
    type: "integer",
    minimum: 1,
    description: "With resized_width, a fixed size instead of the image's own (qwen_vl_utils: rounded to multiples of 28); not with min_pixels/max_pixels.",
  },
  resized_width: { type: "integer", minimum: 1 },
  stream: { type: "boolean", default: false, description: "Server-Sent Events: `token` events, then one `done` event with the answer." },
};

export const OPENAPI = {
  openapi: "3.1.0",
  info: {
    title: "MedVLM-R1 API",
    version: "1.0.0",
    description:
      "Multiple-choice visual question answering on MRI, CT and X-ray images with MedVLM-R1 (Qwen2-VL-2B, GRPO). " +
      "The model writes its reasoning in <think>…</think> and its answer in <answer>X</answer>; the service parses both. " +
      "Research model: not a medical device.",
  },
  servers: [{ url: "/" }],
  security: [{ bearer: [] }],
  paths: {
    "/v1/vqa": {
      post: {
        summary: "Answer a multiple-choice question about one image",
        requestBody: {
          required: true,
          content: {
            "multipart/form-data": {
              schema: {
                type: "object",
                required: ["image", "question", "options"],
                additionalProperties: false,
                properties: {
                  image: { type: "string", format: "binary", description: "PNG, JPEG or WebP; 10 MB max by default." },
                  ...vqaFields,
                  options: { description: "Repeated fields, or one field holding a JSON array.", oneOf: [vqaFields.options, { type: "string" }] },
                },
              },
            },
            "application/json": {
              schema: {
                type: "object",
                required: ["image", "question", "options"],
                additionalProperties: false,
                properties: { image: { type: "string", description: "Base64 or a data:image/…;base64 URI." }, ...vqaFields },
              },
            },
          },
        },
        responses: {
          "200": {
            description: "The parsed answer (JSON), or an SSE stream when `stream` is true.",
            content: {
              "application/json": { schema: { $ref: "#/components/schemas/VqaResponse" } },
              "text/event-stream": { schema: { type: "string", description: "event: token {delta,index,token_id} … event: done VqaResponse | event: error Error" } },
            },
          },
          "400": errorResponse("Malformed request"),
          "401": errorResponse("Missing or invalid token (see WWW-Authenticate)"),
          "403": errorResponse("Token lacks the required scope"),
          "413": errorResponse("Upload too large"),
          "415": errorResponse("Not a PNG, JPEG or WebP image, or the declared type disagrees with the bytes"),
          "422": errorResponse("Invalid image, question, options or parameters, or an unknown field"),
          "429": errorResponse("Rate limited (see Retry-After and RateLimit-* headers)"),
          "502": errorResponse("Backend failure"),
          "503": errorResponse("Backend overloaded or unavailable, or the token issuer's keys unavailable (auth_unavailable); see Retry-After"),
          "504": errorResponse("Backend timeout"),
        },
      },
    },
    "/v1/chat/completions": {
      post: {
        summary: "OpenAI-compatible chat completion (image_url parts must be data: URIs)",
        requestBody: {
          required: true,
          content: {
            "application/json": {
              schema: {
                type: "object",
                required: ["messages"],
                properties: {
                  model: { type: "string" },
                  messages: {
                    type: "array",
                    items: {
                      type: "object",
                      required: ["role", "content"],
                      properties: {
                        role: { enum: ["system", "user", "assistant"] },
                        content: {
                          oneOf: [
                            { type: "string" },
                            {
                              type: "array",
                              items: {
                                oneOf: [
                                  { type: "object", required: ["type", "text"], properties: { type: { const: "text" }, text: { type: "string" } } },
                                  {
                                    type: "object",
                                    required: ["type", "image_url"],
                                    properties: {
                                      type: { const: "image_url" },
                                      image_url: {
                                        type: "object",
                                        required: ["url"],
                                        additionalProperties: false,
                                        properties: {
                                          url: { type: "string", pattern: "^data:image/" },
                                          detail: { const: "auto" },
                                          min_pixels: vqaFields.min_pixels,
                                          max_pixels: vqaFields.max_pixels,
                                          resized_height: vqaFields.resized_height,
                                          resized_width: vqaFields.resized_width,
                                        },
                                      },
                                    },
                                  },
                                ],
                              },
                            },
                          ],
                        },
                      },
                    },
                  },
                  max_tokens: { type: "integer", minimum: 1 },
                  max_completion_tokens: { type: "integer", minimum: 1 },
                  temperature: { type: "number", minimum: 0, maximum: 2, default: 0 },
                  top_p: { type: "number", exclusiveMinimum: 0, maximum: 1 },
                  seed: { type: "integer" },
                  stop: { oneOf: [{ type: "string" }, { type: "array", items: { type: "string" }, maxItems: 4 }] },
                  stream: { type: "boolean" },
                  stream_options: { type: "object", properties: { include_usage: { type: "boolean" } } },
                  n: { const: 1, description: "only one choice" },
                  logprobs: { const: false, description: "not supported: true is refused (422)" },
                  tools: { type: "array", maxItems: 0, description: "not supported: tools, tool_choice other than none and functions are refused (422)" },
                  response_format: { type: "object", properties: { type: { const: "text" } } },
                  frequency_penalty: { const: 0 },
                  presence_penalty: { const: 0 },
                },
              },
            },
          },
        },
        responses: {
          "200": { description: "chat.completion, or chat.completion.chunk SSE ending with data: [DONE]" },
          "400": errorResponse("Malformed request"),
          "401": errorResponse("Missing or invalid token"),
          "415": errorResponse("The body is not declared as application/json"),
          "422": errorResponse("Invalid parameters or images (remote image URLs are refused), or text beyond the context (MAX_PROMPT_CHARS)"),
          "429": errorResponse("Rate limited"),
          "503": errorResponse("Backend overloaded or unavailable, or the token issuer's keys unavailable (auth_unavailable); see Retry-After"),
        },
      },
    },
    "/v1/models": {
      get: {
        summary: "The served model",
        responses: { "200": { description: "OpenAI-style model list", content: { "application/json": { schema: { type: "object" } } } }, "401": errorResponse("Missing or invalid token") },
      },
    },
    "/healthz": { get: { summary: "Liveness of the edge", security: [], responses: { "200": { description: "ok" } } } },
    "/openapi.json": { get: { summary: "This document", security: [], responses: { "200": { description: "OpenAPI 3.1" } } } },
  },
  components: {
    securitySchemes: { bearer: { type: "http", scheme: "bearer", bearerFormat: "JWT", description: "JWT with the `vqa` scope" } },
    schemas: {
      Error: {
        type: "object",
        required: ["error"],
        properties: {
          error: {
            type: "object",
            required: ["code", "message"],
            properties: { code: { enum: Object.keys(ERROR_STATUS) }, message: { type: "string" }, request_id: { type: "string" } },
          },
        },
      },
      VqaResponse: {
        type: "object",
        required: ["id", "answer", "answer_text", "reasoning", "raw", "format_ok", "usage", "timings"],
        properties: {
          id: { type: "string" },
          object: { const: "vqa.answer" },
          model: { type: "string" },
          answer: { type: ["string", "null"], description: "Letter by the reference rule <answer>\\s*([A-Z])\\s*</answer>" },
          answer_text: { type: ["string", "null"] },
          reference_answer: { type: ["string", "null"], description: "Unchecked letter of the reference rule (paper-comparable accuracy)" },
          reasoning: { type: ["string", "null"] },
          raw: { type: "string", description: "Decoded completion, special tokens skipped" },
          format_ok: { type: "boolean" },
          letter_valid: { type: ["boolean", "null"] },
          fallback: { type: ["string", "null"], description: "How a letter was recovered when the reference rule found none" },
          finish_reason: { enum: ["stop", "length"] },
          usage: {
            type: "object",
            properties: {
              prompt_tokens: { type: "integer" },
              image_tokens: { type: "integer" },
              completion_tokens: { type: "integer" },
              completion_tokens_details: {
                type: "object",
                description: "Present when the backend decodes speculatively (DRAFT_TOKENS): draft tokens kept and not; the completion is the same either way",
                properties: { accepted_prediction_tokens: { type: "integer" }, rejected_prediction_tokens: { type: "integer" } },
              },
            },
          },
          timings: { type: "object", additionalProperties: { type: "number" } },
        },
      },
    },
  },
} as const;
