/** Development-style HS256 tokens for edge tests (the test worker's JWT_HS256_SECRET, iss/aud from wrangler.toml). */
import { SignJWT } from "jose";

export const TEST_JWT_SECRET = "test-hs256-secret-0123456789abcdef0123456789abcdef";

export async function token(sub = "clinician-1", scope = "vqa"): Promise<string> {
  return new SignJWT({ scope })
    .setProtectedHeader({ alg: "HS256" })
    .setIssuer("medvlm-dev")
    .setAudience("medvlm-api")
    .setSubject(sub)
    .setIssuedAt()
    .setExpirationTime("10m")
    .sign(new TextEncoder().encode(TEST_JWT_SECRET));
}

export function b64ToBytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** The question and options of a golden case's MedVLM-R1 prompt text ("\n    <q>\nA) …\nD) … \n    Your task…"). */
export function questionAndOptions(text: string): { question: string; options: string[] } {
  const problem = text.slice("\n    ".length, text.indexOf(" \n    Your task: "));
  const [question, ...rest] = problem.split("\n");
  return { question: question!, options: rest.map((l) => l.replace(/^[A-J]\) /, "")) };
}
