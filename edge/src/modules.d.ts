/** Text modules bundled by wrangler's default `**\/*.txt` rule. */
declare module "*.txt" {
  const text: string;
  export default text;
}

/** Binary modules bundled by wrangler's default `**\/*.bin` rule (Data: an ArrayBuffer). */
declare module "*.bin" {
  const data: ArrayBuffer;
  export default data;
}
