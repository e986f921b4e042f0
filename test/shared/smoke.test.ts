import { expect, it } from "vitest";
import { canonicalJson } from "../../shared/src/fingerprint.ts";
it("canon", () => expect(canonicalJson({ b: 1, a: [2] })).toBe('{"a":[2],"b":1}'));
