/** Text modules bundled by wrangler's default `**\/*.txt` rule. */
declare module "*.txt" {
  const text: string;
  export default text;
}
